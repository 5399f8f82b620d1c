package e2ee

import (
	"errors"
)

// PadBlock is the padding bucket: a padded Content is a multiple of it.
const PadBlock = 160

// ErrBadPadding is returned by Unpad when the input does not end in 0x80
// followed by zero or more 0x00 bytes.
var ErrBadPadding = errors.New("e2ee: bad padding")

// Pad returns b followed by 0x80 and then 0x00 bytes up to the next multiple
// of PadBlock (wire.Content's padding rule), in a new slice. Padded lengths
// leak only a size bucket.
func Pad(b []byte) []byte {
	n := (len(b)/PadBlock + 1) * PadBlock // len(b)+1 rounded up to a multiple
	out := make([]byte, n)
	copy(out, b)
	out[len(b)] = 0x80
	return out
}

// Unpad strips the trailing 0x00 bytes and the 0x80 that Pad added. It does
// not insist on a multiple of PadBlock (a peer's bucket size is its choice);
// the result aliases b.
func Unpad(b []byte) ([]byte, error) {
	i := len(b) - 1
	for i >= 0 && b[i] == 0 {
		i--
	}
	if i < 0 || b[i] != 0x80 {
		return nil, ErrBadPadding
	}
	return b[:i:i], nil
}
