package client

import (
	"bytes"
	"testing"

	"github.com/ferryhq/ferry/wire/wirepb"
)

func TestParseWebPushSubscription(t *testing.T) {
	// A browser's PushSubscription.toJSON() (keys base64url, unpadded).
	s := `{"endpoint":"https://push.example/wpush/v2/abc","expirationTime":null,"keys":{"p256dh":"BAECAw","auth":"BAUG_w"}}`
	reg, err := ParseWebPushSubscription(s)
	if err != nil {
		t.Fatal(err)
	}
	if reg.Kind != wirepb.PushKind_WEBPUSH || reg.Endpoint != "https://push.example/wpush/v2/abc" ||
		!bytes.Equal(reg.P256Dh, []byte{4, 1, 2, 3}) || !bytes.Equal(reg.Auth, []byte{4, 5, 6, 0xff}) {
		t.Fatalf("parsed %v", reg)
	}
	for _, bad := range []string{``, `{}`, `{"endpoint":"https://x"}`, `{"endpoint":"https://x","keys":{"p256dh":"!!","auth":"AA"}}`, `[1]`} {
		if _, err := ParseWebPushSubscription(bad); err == nil {
			t.Errorf("ParseWebPushSubscription(%q) accepted", bad)
		}
	}
}

func FuzzParseWebPushSubscription(f *testing.F) {
	f.Add(`{"endpoint":"https://push.example/x","keys":{"p256dh":"BAECAw","auth":"BAUG_w"}}`)
	f.Add(`{"keys":{}}`)
	f.Fuzz(func(t *testing.T, s string) {
		reg, err := ParseWebPushSubscription(s)
		if err == nil && (reg.Endpoint == "" || len(reg.P256Dh) == 0 || len(reg.Auth) == 0) {
			t.Fatalf("accepted an incomplete subscription %q", s)
		}
	})
}
