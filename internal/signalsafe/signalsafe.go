// Package signalsafe holds what every server-side caller of
// go.mau.fi/libsignal needs (see ../shared/libsignal-notes.md): Protect turns
// the library's panics on malformed input into errors, and importing the
// package installs a logger that drops the library's Debug output (which
// formats key material) before anything can log.
//
// The client's Signal layer (client/e2ee) installs its own, forwarding
// logger and keeps its own recover wrapper, which also counts panics.
package signalsafe

import (
	"fmt"
	"log"

	"go.mau.fi/libsignal/logger"
)

// Protect runs f and turns a panic into an error. A panic inside libsignal
// is a bug of ours (unchecked input), never a crash of the node.
func Protect(f func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("libsignal panicked: %v", r)
		}
	}()
	f()
	return nil
}

// quiet drops Debug and Info and sends warnings and errors to the standard
// logger instead of stdout.
type quiet struct{}

func (quiet) Debug(string, string) {}
func (quiet) Info(string, string)  {}
func (quiet) Warning(caller, msg string) {
	log.Printf("libsignal: warning: %s: %s", caller, msg)
}
func (quiet) Error(caller, msg string) {
	log.Printf("libsignal: error: %s: %s", caller, msg)
}
func (quiet) Configure(string) {}

// init installs the quiet logger unless one was set up already: libsignal
// installs its default one lazily and without synchronization on its first
// log call, which races when two verifications run at once.
func init() {
	if logger.Logger == nil {
		var l logger.Loggable = quiet{}
		logger.Setup(&l)
	}
}
