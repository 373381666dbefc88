package latest

import "testing"

func TestPutKeepsOnlyTheNewest(t *testing.T) {
	ch := make(chan int, 1)
	Put(ch, 1)
	Put(ch, 2) // must not block, and must replace 1
	if got := <-ch; got != 2 {
		t.Fatalf("read %d, want the newest value 2", got)
	}
	select {
	case v := <-ch:
		t.Fatalf("a second value %d was waiting", v)
	default:
	}
}
