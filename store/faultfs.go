//go:build faultfs

package store

// A ferryd built with -tags faultfs fails WAL writes and syncs while a file
// named FAULT exists in its data directory, for the black-box storage
// fault test (cmd/ferryd: TestBlackBoxFsyncFailureExits). Never in a
// normal build.

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

func faultFS(dir string) vfs.FS {
	trigger := filepath.Join(dir, "FAULT")
	return errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
		switch op.Kind {
		case errorfs.OpFileSync, errorfs.OpFileSyncData, errorfs.OpFileWrite:
		default:
			return nil
		}
		if !strings.HasSuffix(op.Path, ".log") {
			return nil
		}
		if _, err := os.Stat(trigger); err == nil {
			return errorfs.ErrInjected
		}
		return nil
	}))
}
