package bgp

import (
	"log/slog"
	"os"
	"strings"
	"sync"
)

var disableMPTCPOnce sync.Once

// disableListenerMPTCP makes Go open plain TCP listeners again. Since Go
// 1.24, net.Listen creates Multipath TCP sockets on Linux, and on those
// TCP_MD5SIG fails (ENOPROTOOPT) and IP_TTL fails (EOPNOTSUPP): GoBGP then
// only logs a warning and peers with passwords never establish, and TTL
// handling for eBGP breaks. GoBGP's listener takes its settings from
// GODEBUG, which the runtime re-reads when the variable changes. An explicit
// multipathtcp setting is respected.
func disableListenerMPTCP(logger *slog.Logger) {
	disableMPTCPOnce.Do(func() {
		current := os.Getenv("GODEBUG")
		for _, kv := range strings.Split(current, ",") {
			if strings.HasPrefix(strings.TrimSpace(kv), "multipathtcp=") {
				logger.Warn("GODEBUG sets multipathtcp explicitly; BGP TCP MD5 passwords and TTL need it to be 0", "godebug", current)
				return
			}
		}
		value := "multipathtcp=0"
		if current != "" {
			value = current + "," + value
		}
		if err := os.Setenv("GODEBUG", value); err != nil {
			logger.Warn("could not disable Multipath TCP; BGP TCP MD5 passwords will not work", "error", err)
			return
		}
		logger.Debug("disabled Multipath TCP listeners (TCP MD5 and TTL need plain TCP)")
	})
}
