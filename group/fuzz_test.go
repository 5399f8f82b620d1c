package group

import (
	"errors"
	"testing"
	"unicode/utf8"
)

// FuzzParseID checks the one thing clients send this package as bytes: a
// group id. Only 32 lowercase hex characters parse, and they round-trip.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{"", "0123456789abcdef0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF",
		"0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef00", "g123456789abcdef0123456789abcdef",
		"０123456789abcdef0123456789abcde", "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseID(s)
		if ok := idRE.MatchString(s); ok != (err == nil) {
			t.Fatalf("ParseID(%q) = %v, rule says valid=%v", s, err, ok)
		}
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("ParseID(%q) = %v, not BAD_REQUEST", s, err)
			}
			return
		}
		if FormatID(id[:]) != s {
			t.Fatalf("FormatID(ParseID(%q)) = %q", s, FormatID(id[:]))
		}
	})
}

func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"", "a", "friends", "groupe d'amis ✓", "\xff", string(make([]byte, 64)), string(make([]byte, 65))} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := ValidateName(s)
		if ok := len(s) >= 1 && len(s) <= MaxNameBytes && utf8.ValidString(s); ok != (err == nil) {
			t.Fatalf("ValidateName(%q) = %v, rule says valid=%v", s, err, ok)
		}
		if err != nil && !errors.Is(err, ErrBadRequest) {
			t.Fatalf("ValidateName(%q) = %v, not BAD_REQUEST", s, err)
		}
	})
}
