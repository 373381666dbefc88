package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/coreos/go-iptables/iptables"

	"github.com/fabricnet/fabric/nat"
)

// sweepFabricChains is --cleanup's last pass over iptables: whatever chain
// named FABRIC-* is still in any table (left by an older fabricd, a crashed
// apply, or a chain the nat and policy packages no longer know), its jumps
// from the built-in chains and the chain itself are removed, one rule at a
// time. Teardown needs no atomic update, so go-iptables' per-rule calls,
// with their "does not exist" errors, are the simpler tool here.
func sweepFabricChains(log *slog.Logger) error {
	ipt, err := iptables.New()
	if err != nil {
		return fmt.Errorf("iptables: %w", err)
	}
	var errs []error
	for _, table := range []string{"filter", "nat", "mangle", "raw"} {
		chains, err := ipt.ListChains(table)
		if err != nil {
			continue // a table this kernel does not have
		}
		var ours []string
		for _, c := range chains {
			if strings.HasPrefix(c, nat.ChainPrefix) {
				ours = append(ours, c)
			}
		}
		if len(ours) == 0 {
			continue
		}
		// Jumps first: a chain that is still referenced cannot be deleted.
		// They go by position, from the last, so the positions of the
		// earlier ones stay valid (and comments need no re-quoting).
		for _, c := range chains {
			if strings.HasPrefix(c, nat.ChainPrefix) {
				continue
			}
			rules, err := ipt.List(table, c)
			if err != nil {
				errs = append(errs, fmt.Errorf("list %s/%s: %w", table, c, err))
				continue
			}
			var jumps []int
			pos := 0
			for _, r := range rules {
				spec := strings.Fields(r)
				if len(spec) == 0 || spec[0] != "-A" {
					continue // the chain's policy line
				}
				pos++
				if jumpsToFabric(spec) {
					jumps = append(jumps, pos)
				}
			}
			for i := len(jumps) - 1; i >= 0; i-- {
				if err := ipt.DeleteById(table, c, jumps[i]); err != nil && !isNotExist(err) {
					errs = append(errs, fmt.Errorf("delete rule %d of %s/%s: %w", jumps[i], table, c, err))
				}
			}
		}
		for _, c := range ours {
			if err := ipt.ClearAndDeleteChain(table, c); err != nil && !isNotExist(err) {
				errs = append(errs, fmt.Errorf("delete chain %s/%s: %w", table, c, err))
				continue
			}
			log.Info("removed leftover iptables chain", "table", table, "chain", c)
		}
	}
	return errors.Join(errs...)
}

func jumpsToFabric(spec []string) bool {
	for i := 0; i+1 < len(spec); i++ {
		if (spec[i] == "-j" || spec[i] == "-g") && strings.HasPrefix(spec[i+1], nat.ChainPrefix) {
			return true
		}
	}
	return false
}

func isNotExist(err error) bool {
	var e *iptables.Error
	return errors.As(err, &e) && e.IsNotExist()
}
