package testvectors

import (
	"crypto/rand"
	"encoding/binary"
	"io"
	mathrand "math/rand/v2"
	"sync"
)

// Deterministic randomness for the generator and for the Signal vectors'
// verifier, outside tests.
//
// testing/cryptotest.SetGlobalRandom(t, seed) only works in test binaries.
// It does two things: it sets crypto/rand.Reader to a locked ChaCha8 stream
// seeded with seed (little-endian in the first 8 of 32 bytes), and it
// points crypto/internal/rand at the same stream (for the crypto packages
// that, since Go 1.26, ignore the io.Reader they are given). libsignal reads
// only crypto/rand.Reader (io.ReadFull and rand.Read, which honours a
// replaced Reader), XEdDSA included, so the first half is all that matters
// here, and it is an exported variable. withSeed does exactly that; a test
// (TestSeededMatchesCryptotest) checks that it gives the bytes
// SetGlobalRandom gives.
//
// While f runs, every user of crypto/rand in the process gets the seeded,
// public stream: never call it in a process that does real cryptography
// (the ferry CLI does so only for "ferry vectors", which has no device).

var randMu sync.Mutex // one seeded section at a time

type lockedReader struct {
	mu sync.Mutex
	r  *mathrand.ChaCha8
}

func (lr *lockedReader) Read(b []byte) (int, error) {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.r.Read(b)
}

// seededReader returns the stream cryptotest.SetGlobalRandom(t, seed) sets.
func seededReader(seed uint64) io.Reader {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:8], seed)
	return &lockedReader{r: mathrand.NewChaCha8(s)}
}

// withSeed runs f with crypto/rand.Reader replaced by the seeded stream and
// restores it afterwards.
func withSeed[T any](seed uint64, f func() (T, error)) (T, error) {
	randMu.Lock()
	defer randMu.Unlock()
	prev := rand.Reader
	rand.Reader = seededReader(seed)
	defer func() { rand.Reader = prev }()
	return f()
}
