package agent

import "go.uber.org/zap"

// quietZap keeps the etcd client's own logger to errors; fabricd reports
// etcd trouble itself, with context, through slog.
func quietZap() *zap.Logger {
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(zap.ErrorLevel)
	l, err := cfg.Build()
	if err != nil {
		return zap.NewNop()
	}
	return l
}
