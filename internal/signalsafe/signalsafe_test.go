package signalsafe

import (
	"testing"

	"go.mau.fi/libsignal/logger"
)

func TestSignalLoggerInstalled(t *testing.T) {
	if _, ok := logger.Logger.(quiet); !ok {
		t.Fatalf("libsignal logger is %T, want quiet", logger.Logger)
	}
}

// TestProtect: a panic inside a libsignal call becomes an error.
func TestProtect(t *testing.T) {
	if err := Protect(func() { panic("boom") }); err == nil {
		t.Fatal("panic not turned into an error")
	}
	if err := Protect(func() {}); err != nil {
		t.Fatal(err)
	}
}
