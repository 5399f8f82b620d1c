package testvectors

import (
	"bytes"

	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
)

func init() {
	families = append(families, family{kind: KindDeviceList, verdict: devicelist.KindNames(),
		gen: deviceListVectors, decode: func() vector { return &DeviceListVector{} }})
}

// createdMs is the fixed creation time of every generated list (2026-01-01).
const createdMs = 1767225600000

type entry struct {
	id  uint32
	key []byte
}

func dl(username string, version uint64, es ...entry) *wirepb.DeviceList {
	l := &wirepb.DeviceList{Username: username, Version: version, CreatedMs: createdMs}
	for _, e := range es {
		l.Devices = append(l.Devices, &wirepb.DeviceListEntry{DeviceId: e.id, IdentityKey: e.key})
	}
	return l
}

func dev(id uint32, name string) entry { return entry{id, pubKey(name)} }

// sign encodes l deterministically and signs it with signer's key without
// any check (vectors need invalid lists too).
func sign(signer string, l *wirepb.DeviceList) *wirepb.SignedDeviceList {
	b, err := devicelist.Encode(l)
	if err != nil {
		panic(err) // the generator's own lists always encode
	}
	sig := ecc.CalculateSignature(fixedKey(signer).PrivateKey(), devicelist.SignedBytes(b))
	return &wirepb.SignedDeviceList{List: b, Signature: sig[:]}
}

// deviceListVectors builds every devicelist vector, by file name.
// XEdDSA signing draws randomness from crypto/rand: each case's signing
// starts from the same fixed stream, so the output depends on nothing else.
func deviceListVectors() (map[string]vector, error) {
	keys := map[string]Hex{}
	for _, n := range []string{"bob.1", "bob.2", "bob.3", "carol.1", "eve"} {
		keys[n] = pubKey(n)
	}
	s := func(signer string, l *wirepb.DeviceList) *wirepb.SignedDeviceList {
		sl, _ := withSeed(1, func() (*wirepb.SignedDeviceList, error) { return sign(signer, l), nil })
		return sl
	}
	v1 := s("bob.1", dl("bob", 1, dev(1, "bob.1"), dev(2, "bob.2")))
	v2 := s("bob.1", dl("bob", 2, dev(1, "bob.1"), dev(2, "bob.2"), dev(3, "bob.3")))
	v2other := s("bob.1", dl("bob", 2, dev(1, "bob.1"), dev(3, "bob.3")))
	flipped := func(sl *wirepb.SignedDeviceList, inList bool, i int) *wirepb.SignedDeviceList {
		c := &wirepb.SignedDeviceList{List: bytes.Clone(sl.List), Signature: bytes.Clone(sl.Signature)}
		if inList {
			c.List[i] ^= 0x01
		} else {
			c.Signature[i] ^= 0x01
		}
		return c
	}
	// The server appends a device with a key it made up, keeping the signature.
	added := dl("bob", 2, dev(1, "bob.1"), dev(2, "bob.2"), dev(3, "bob.3"), dev(4, "eve"))
	addedBytes, _ := devicelist.Encode(added)
	serverAdded := &wirepb.SignedDeviceList{List: addedBytes, Signature: bytes.Clone(v2.Signature)}
	shortKey := entry{2, pubKey("bob.2")[:32]}

	type c struct {
		desc, expect string
		user         string
		pinned       []byte
		seenV        uint64
		seenList     []byte
		sl           *wirepb.SignedDeviceList
	}
	bob1 := pubKey("bob.1")
	cases := map[string]c{
		"valid-tofu": {"first list of bob seen (no pinned key): trusted on first use; pin bob.1's key",
			ExpectValid, "bob", nil, 0, nil, v1},
		"valid-pinned": {"bob's version 2, signed by the pinned key, after version 1",
			ExpectValid, "bob", bob1, 1, v1.List, v2},
		"valid-same-version-same-bytes": {"the list seen before, served again",
			ExpectValid, "bob", bob1, 2, v2.List, v2},
		"tampered-list-byte": {"one bit of the signed list bytes flipped (in created_ms)",
			"ErrBadSignature", "bob", bob1, 1, v1.List, flipped(v2, true, len(v2.List)-1)},
		"tampered-signature": {"one bit of the signature flipped",
			"ErrBadSignature", "bob", bob1, 1, v1.List, flipped(v2, false, 0)},
		"server-added-device": {"the server added device 4 with a key it made up and kept the signature",
			"ErrBadSignature", "bob", bob1, 1, v1.List, serverAdded},
		"signed-by-other-key-tofu": {"names bob.1 as device 1 but is signed by another key (no pinned key)",
			"ErrBadSignature", "bob", nil, 0, nil, s("eve", dl("bob", 1, dev(1, "bob.1")))},
		"rollback-older-version": {"version 1 served after version 2 was seen",
			"ErrRollback", "bob", bob1, 2, v2.List, v1},
		"same-version-different-bytes": {"version 2 with other devices than the version 2 seen before",
			"ErrRollback", "bob", bob1, 2, v2.List, v2other},
		"wrong-signer": {"a self-consistent list for bob whose device 1 and signer is eve, not the pinned bob.1",
			"ErrWrongSigner", "bob", bob1, 2, v2.List, s("eve", dl("bob", 3, dev(1, "eve"), dev(2, "bob.2")))},
		"wrong-account": {"carol's valid list served as bob's",
			"ErrWrongAccount", "bob", nil, 0, nil, s("carol.1", dl("carol", 1, dev(1, "carol.1")))},
		"missing-device-1": {"no device 1 (the primary)",
			"ErrInvalid", "bob", nil, 0, nil, s("bob.2", dl("bob", 1, dev(2, "bob.2"), dev(3, "bob.3")))},
		"unsorted-devices": {"device ids not strictly ascending",
			"ErrInvalid", "bob", bob1, 1, v1.List, s("bob.1", dl("bob", 2, dev(1, "bob.1"), dev(3, "bob.3"), dev(2, "bob.2")))},
		"bad-identity-key-length": {"device 2's identity key is 32 bytes",
			"ErrInvalid", "bob", bob1, 1, v1.List, s("bob.1", dl("bob", 2, dev(1, "bob.1"), shortKey))},
		"version-zero": {"version 0 (versions start at 1)",
			"ErrInvalid", "bob", nil, 0, nil, s("bob.1", dl("bob", 0, dev(1, "bob.1")))},
	}
	out := make(map[string]vector, len(cases))
	for name, k := range cases {
		v := &DeviceListVector{
			Header: Header{Kind: KindDeviceList, Description: k.desc, Expect: k.expect}, Username: k.user,
			PinnedIdentityKey: Hex(k.pinned), SeenVersion: k.seenV, SeenList: Hex(k.seenList),
			SignedList: SignedList{List: k.sl.List, Signature: k.sl.Signature},
			List:       Decode(k.sl.List), Keys: keys,
		}
		if v.PinnedIdentityKey == nil {
			v.PinnedIdentityKey = Hex{}
		}
		out[name] = v
	}
	return out, nil
}
