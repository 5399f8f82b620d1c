//go:build !faultfs

package store

import "github.com/cockroachdb/pebble/v2/vfs"

// faultFS is the disk file system of Open: nil (the OS) except in the
// faultfs test build (faultfs.go).
func faultFS(string) vfs.FS { return nil }
