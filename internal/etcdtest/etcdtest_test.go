package etcdtest

import (
	"context"
	"testing"
	"time"
)

func TestSingleMemberPutGet(t *testing.T) {
	c := Start(t)
	cli := c.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("get k: %v %v", resp, err)
	}
}

func TestClusterSurvivesOneMemberDown(t *testing.T) {
	c := StartCluster(t, 3)
	cli := c.Client(t)
	c.StopMember(0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Member 0 may have been the leader: a write succeeds once the other
	// two have elected a new one.
	PutAsAgent(ctx, t, cli, "k", "v")
	c.RestartMember(0)
	only0 := c.ClientFor(t, c.Endpoint(0))
	resp, err := only0.Get(ctx, "k")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get from restarted member: %v %v", resp, err)
	}
}
