package policy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdwatch"
)

// DefaultKeyName is the key below <prefix>/policy/ holding the default
// action. Rule names cannot start with "_", so it never clashes with a rule.
const DefaultKeyName = "_default"

// maxTxnOps is etcd's default --max-txn-ops; a larger file cannot be stored
// in one transaction.
const maxTxnOps = 128

func policyDir(prefix string) string { return strings.TrimRight(prefix, "/") + "/policy/" }

// RuleKey is the etcd key of one rule.
func RuleKey(prefix, name string) string { return policyDir(prefix) + name }

// DefaultKey is the etcd key of the default action.
func DefaultKey(prefix string) string { return policyDir(prefix) + DefaultKeyName }

// Put stores rules in one transaction: either all are stored or none.
// Rules with existing names are replaced. Invalid rules refuse the batch.
func Put(ctx context.Context, cli *clientv3.Client, prefix string, rules []Rule) error {
	return PutDocument(ctx, cli, prefix, Document{Rules: rules})
}

// PutDocument stores a parsed file's rules and, if set, its default action
// in one transaction.
func PutDocument(ctx context.Context, cli *clientv3.Client, prefix string, doc Document) error {
	ops, err := documentOps(prefix, doc)
	if err != nil {
		return err
	}
	if len(ops) == 0 {
		return nil
	}
	if len(ops) > maxTxnOps {
		return fmt.Errorf("store policy: %d rules exceed etcd's %d operations per transaction; split the file (nothing stored)", len(ops), maxTxnOps)
	}
	if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		return fmt.Errorf("store policy: etcd txn at %s: %w", policyDir(prefix), err)
	}
	return nil
}

// documentOps are the puts that store a document, after checking it.
func documentOps(prefix string, doc Document) ([]clientv3.Op, error) {
	var ops []clientv3.Op
	seen := map[string]bool{}
	for _, r := range doc.Rules {
		if err := r.Validate(); err != nil {
			return nil, fmt.Errorf("store policy: %w (nothing stored)", err)
		}
		if seen[r.Name] {
			return nil, fmt.Errorf("store policy: rule %q: duplicate name (nothing stored)", r.Name)
		}
		seen[r.Name] = true
		b, err := json.Marshal(r)
		if err != nil {
			return nil, fmt.Errorf("store policy: rule %q: %w", r.Name, err)
		}
		ops = append(ops, clientv3.OpPut(RuleKey(prefix, r.Name), string(b)))
	}
	if doc.DefaultAction != "" {
		if err := ValidateAction(doc.DefaultAction); err != nil {
			return nil, fmt.Errorf("store policy: default %w (nothing stored)", err)
		}
		ops = append(ops, clientv3.OpPut(DefaultKey(prefix), doc.DefaultAction))
	}
	return ops, nil
}

// ReplaceDocument makes the stored rules exactly the document's, in one
// transaction: its rules are stored and every other stored rule is deleted
// (the default action is replaced only when the document sets one). It
// returns the names of the rules it deleted. A concurrent change to the
// policy makes it fail and store nothing.
func ReplaceDocument(ctx context.Context, cli *clientv3.Client, prefix string, doc Document) ([]string, error) {
	resp, err := cli.Get(ctx, policyDir(prefix), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("store policy: read %s: %w", policyDir(prefix), err)
	}
	keep := map[string]bool{DefaultKey(prefix): true}
	for _, r := range doc.Rules {
		keep[RuleKey(prefix, r.Name)] = true
	}
	var removed []string
	var deletes []clientv3.Op
	for _, kv := range resp.Kvs {
		if key := string(kv.Key); !keep[key] {
			removed = append(removed, strings.TrimPrefix(key, policyDir(prefix)))
			deletes = append(deletes, clientv3.OpDelete(key))
		}
	}
	puts, err := documentOps(prefix, doc)
	if err != nil {
		return nil, err
	}
	ops := append(deletes, puts...)
	if len(ops) == 0 {
		return nil, nil
	}
	if len(ops) > maxTxnOps {
		return nil, fmt.Errorf("store policy: %d rules to store and delete exceed etcd's %d operations per transaction (nothing stored)", len(ops), maxTxnOps)
	}
	unchanged := clientv3.Compare(clientv3.ModRevision(policyDir(prefix)).WithPrefix(), "<", resp.Header.Revision+1)
	txn, err := cli.Txn(ctx).If(unchanged).Then(ops...).Commit()
	if err != nil {
		return nil, fmt.Errorf("store policy: etcd txn at %s: %w", policyDir(prefix), err)
	}
	if !txn.Succeeded {
		return nil, fmt.Errorf("store policy: the policy changed in etcd meanwhile (nothing stored); apply again")
	}
	return removed, nil
}

// SetDefaultAction stores the default action ("allow" or "deny").
func SetDefaultAction(ctx context.Context, cli *clientv3.Client, prefix, action string) error {
	if err := ValidateAction(action); err != nil {
		return fmt.Errorf("set default policy: %w", err)
	}
	if _, err := cli.Put(ctx, DefaultKey(prefix), action); err != nil {
		return fmt.Errorf("set default policy at %s: %w", DefaultKey(prefix), err)
	}
	return nil
}

// ErrNotFound is returned by Delete for a rule that is not stored.
var ErrNotFound = errors.New("not found")

// Delete removes one rule.
func Delete(ctx context.Context, cli *clientv3.Client, prefix, name string) error {
	key := RuleKey(prefix, name)
	resp, err := cli.Delete(ctx, key)
	if err != nil {
		return fmt.Errorf("delete policy rule %q at %s: %w", name, key, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("delete policy rule %q: no such rule at %s: %w", name, key, ErrNotFound)
	}
	return nil
}

// Policy is the whole stored policy.
type Policy struct {
	DefaultAction string `json:"defaultAction"` // allow or deny
	Rules         []Rule `json:"rules"`         // in evaluation order
}

// List returns all stored rules in evaluation order. A malformed stored
// value is an error naming its key.
func List(ctx context.Context, cli *clientv3.Client, prefix string) ([]Rule, error) {
	p, err := Get(ctx, cli, prefix)
	return p.Rules, err
}

// Get returns the stored rules and default action.
func Get(ctx context.Context, cli *clientv3.Client, prefix string) (Policy, error) {
	resp, err := cli.Get(ctx, policyDir(prefix), clientv3.WithPrefix())
	if err != nil {
		return Policy{}, fmt.Errorf("list policy at %s: %w", policyDir(prefix), err)
	}
	kvs := map[string][]byte{}
	for _, kv := range resp.Kvs {
		kvs[string(kv.Key)] = kv.Value
	}
	p, bad := decodePolicy(prefix, kvs)
	if len(bad) > 0 {
		return p, errors.Join(bad...)
	}
	return p, nil
}

// decodePolicy decodes every stored value; malformed ones are returned as
// errors naming their key and left out of the policy.
func decodePolicy(prefix string, kvs map[string][]byte) (Policy, []error) {
	dir := policyDir(prefix)
	p := Policy{DefaultAction: ActionAllow}
	var bad []error
	for key, val := range kvs {
		name := strings.TrimPrefix(key, dir)
		if name == DefaultKeyName {
			if err := ValidateAction(string(val)); err != nil {
				bad = append(bad, fmt.Errorf("etcd key %s: default %w", key, err))
				continue
			}
			p.DefaultAction = string(val)
			continue
		}
		var r Rule
		dec := json.NewDecoder(strings.NewReader(string(val)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&r); err != nil {
			bad = append(bad, fmt.Errorf("etcd key %s: malformed policy rule: %w", key, err))
			continue
		}
		if err := r.Validate(); err != nil {
			bad = append(bad, fmt.Errorf("etcd key %s: %w", key, err))
			continue
		}
		if r.Name != name {
			bad = append(bad, fmt.Errorf("etcd key %s: holds rule named %q", key, r.Name))
			continue
		}
		p.Rules = append(p.Rules, r)
	}
	SortRules(p.Rules)
	slices.SortFunc(bad, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
	return p, bad
}

// WatchPolicy sends the whole stored policy (rules and default action) at
// start and after every change, until ctx ends. A slow reader only misses
// intermediate states, never the latest.
//
// A malformed stored value (rule or default) is logged as an error naming
// its key, and security decisions fail closed:
//   - once a policy has been sent, no new one is sent while any stored value
//     is malformed, since a skipped deny rule would silently open traffic:
//     the reader keeps enforcing the last good one;
//   - at start, when there is no last good policy, the valid rules are sent
//     with the default action deny, whatever is stored: nothing is opened
//     that a malformed rule might have closed.
func WatchPolicy(ctx context.Context, cli *clientv3.Client, prefix string, logger *slog.Logger) <-chan Policy {
	if logger == nil {
		logger = slog.Default()
	}
	sentAny := false
	return etcdwatch.Watch(ctx, cli, policyDir(prefix), logger, func(kvs etcdwatch.KVs) (Policy, bool) {
		p, bad := decodePolicy(prefix, kvs)
		for _, err := range bad {
			logger.Error("malformed stored policy value; fix or delete the key", "err", err)
		}
		if len(bad) > 0 {
			if sentAny {
				logger.Error("POLICY NOT UPDATED: keeping the policy in force until every stored policy value is valid", "malformed", len(bad))
				return Policy{}, false
			}
			logger.Error("no policy in force yet and some stored values are malformed: enforcing the valid rules with default deny until every value is valid",
				"malformed", len(bad), "valid", len(p.Rules))
			p.DefaultAction = ActionDeny
		}
		sentAny = true
		return p, true
	})
}
