package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/cockroachdb/pebble/v2"
)

// Compaction for audits: after Compact, the files of the store hold only
// its live records, so nothing acked or expired survives in them.
//
// Pebble's own DB.Compact is not enough: a flushed sstable that overlaps
// nothing below is moved to the bottom level as it is, deleted values and
// all, and write-ahead log files are recycled with their old records in
// them. So Compact copies the live records (what an iterator sees) into a
// new store in the subfolder compact.new, and then swaps the files:
//
//  1. build compact.new and sync it (a crash here leaves the old store;
//     the next Open removes compact.new);
//  2. write the marker COMPACTING = "delete" and remove every file of the
//     old store (Pebble's files only, by name);
//  3. set the marker to "move" and move the new files up;
//  4. remove compact.new and the marker.
//
// Open finishes an interrupted swap from the marker, so a crash at any
// point leaves either the old store or the new one, never a mix.

const (
	compactDir    = "compact.new"
	compactMarker = "COMPACTING"
)

// pebbleFile matches the names of the files Pebble keeps in its directory;
// the swap removes only those (anything else in the folder stays).
var pebbleFile = regexp.MustCompile(`^([0-9]+\.(sst|log|blob|dbtmp)|MANIFEST-[0-9]+|OPTIONS-[0-9]+|marker\..+|LOCK|CURRENT)$`)

// Compact rewrites the stopped database in dir so that its files hold only
// live records. The database must not be open. ferryd runs it on exit with
// --compact-on-exit.
func Compact(dir string) error {
	if err := finishCompact(dir); err != nil {
		return fmt.Errorf("store: compact %s: %w", dir, err)
	}
	tmp := filepath.Join(dir, compactDir)
	if err := copyLive(dir, tmp); err != nil {
		return fmt.Errorf("store: compact %s: %w", dir, errors.Join(err, os.RemoveAll(tmp)))
	}
	if err := setMarker(dir, "delete"); err != nil {
		return fmt.Errorf("store: compact %s: %w", dir, errors.Join(err, os.RemoveAll(tmp)))
	}
	if err := finishCompact(dir); err != nil {
		return fmt.Errorf("store: compact %s: %w", dir, err)
	}
	return nil
}

// copyLive copies every live record of the store in dir into a new store
// in tmp, synced.
func copyLive(dir, tmp string) error {
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	src, err := Open(dir, Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := Open(tmp, Options{})
	if err != nil {
		return err
	}
	it, err := src.NewIter(nil)
	if err != nil {
		return errors.Join(err, dst.Close())
	}
	b := dst.NewBatch()
	for it.First(); it.Valid() && err == nil; it.Next() {
		err = b.Set(it.Key(), it.Value(), nil)
		if err == nil && b.Len() > 1<<20 {
			err = b.Commit(pebble.NoSync)
			b = dst.NewBatch()
		}
	}
	err = errors.Join(err, it.Error(), it.Close())
	if err == nil {
		err = b.Commit(pebble.Sync)
	}
	err = errors.Join(err, dst.Flush())
	return errors.Join(err, dst.Close())
}

func setMarker(dir, phase string) error {
	p := filepath.Join(dir, compactMarker)
	if err := os.WriteFile(p+".tmp", []byte(phase), 0o600); err != nil {
		return err
	}
	if err := syncFile(p + ".tmp"); err != nil {
		return err
	}
	if err := os.Rename(p+".tmp", p); err != nil {
		return err
	}
	return syncFile(dir)
}

func syncFile(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}

// finishCompact completes or undoes an interrupted Compact in dir.
func finishCompact(dir string) error {
	phase, err := os.ReadFile(filepath.Join(dir, compactMarker))
	tmp := filepath.Join(dir, compactDir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// No swap started: a leftover compact.new is an unfinished copy.
		return os.RemoveAll(tmp)
	case err != nil:
		return err
	}
	if string(phase) == "delete" {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if n := e.Name(); pebbleFile.MatchString(n) && !e.IsDir() {
				if err := os.Remove(filepath.Join(dir, n)); err != nil {
					return err
				}
			}
		}
		if err := setMarker(dir, "move"); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(tmp)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		if err := os.Rename(filepath.Join(tmp, e.Name()), filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := syncFile(dir); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, compactMarker)); err != nil {
		return err
	}
	return syncFile(dir)
}
