package bgp

import (
	"context"
	"fmt"
	"log/slog"
	"sort"

	gobgplog "github.com/osrg/gobgp/v3/pkg/log"
)

// slogAdapter feeds GoBGP's log.Logger interface into slog. GoBGP logs its
// per-message chatter at Info ("Add a peer configuration", state changes);
// those stay at Info, its Debug output goes to Debug.
type slogAdapter struct {
	logger *slog.Logger
}

var _ gobgplog.Logger = (*slogAdapter)(nil)

func newSlogAdapter(logger *slog.Logger) *slogAdapter {
	return &slogAdapter{logger: logger.With("component", "gobgp")}
}

func (a *slogAdapter) log(level slog.Level, msg string, fields gobgplog.Fields) {
	ctx := context.Background()
	if !a.logger.Enabled(ctx, level) {
		return
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	attrs := make([]slog.Attr, 0, len(keys))
	for _, k := range keys {
		v := fields[k]
		if err, ok := v.(error); ok {
			v = err.Error()
		} else if s, ok := v.(fmt.Stringer); ok {
			v = s.String()
		}
		attrs = append(attrs, slog.Any(k, v))
	}
	a.logger.LogAttrs(ctx, level, msg, attrs...)
}

// Panic is only used by GoBGP for internal logic bugs; keep its semantics.
func (a *slogAdapter) Panic(msg string, fields gobgplog.Fields) {
	a.log(slog.LevelError, msg, fields)
	panic(msg)
}

// Fatal is logged as an error without exiting: an embedded library must not
// end fabricd. GoBGP uses it for a failed gRPC listen, which Start detects
// by itself (the socket never appears).
func (a *slogAdapter) Fatal(msg string, fields gobgplog.Fields) {
	a.log(slog.LevelError, msg, fields)
}

func (a *slogAdapter) Error(msg string, fields gobgplog.Fields) {
	a.log(slog.LevelError, msg, fields)
}

func (a *slogAdapter) Warn(msg string, fields gobgplog.Fields) {
	a.log(slog.LevelWarn, msg, fields)
}

func (a *slogAdapter) Info(msg string, fields gobgplog.Fields) {
	a.log(slog.LevelInfo, msg, fields)
}

func (a *slogAdapter) Debug(msg string, fields gobgplog.Fields) {
	a.log(slog.LevelDebug, msg, fields)
}

// SetLevel is ignored: the slog handler owns the level.
func (a *slogAdapter) SetLevel(gobgplog.LogLevel) {}

// GetLevel reports what the slog handler would print, so GoBGP skips
// building debug messages nobody will see.
func (a *slogAdapter) GetLevel() gobgplog.LogLevel {
	ctx := context.Background()
	switch {
	case a.logger.Enabled(ctx, slog.LevelDebug):
		return gobgplog.DebugLevel
	case a.logger.Enabled(ctx, slog.LevelInfo):
		return gobgplog.InfoLevel
	case a.logger.Enabled(ctx, slog.LevelWarn):
		return gobgplog.WarnLevel
	default:
		return gobgplog.ErrorLevel
	}
}
