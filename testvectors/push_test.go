package testvectors

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The parts of a push vector that are checked rather than compared (the
// JWTs' claims, wall-clock members and signatures) still catch a change.
func TestPushJWTChecked(t *testing.T) {
	for name, mutate := range map[string]func(v *PushVector){
		"apns-message claim":     func(v *PushVector) { v.Request.JWT.Claims["iss"] = json.RawMessage(`"OTHERTEAM1"`) },
		"apns-message header":    func(v *PushVector) { v.Request.JWT.Header = `{"alg":"ES256","typ":"JWT"}` },
		"apns-message key":       func(v *PushVector) { v.Request.JWT.Key = p256Priv("other").PublicKey().Bytes() },
		"apns-message iat":       func(v *PushVector) { v.NowMs += 1000 },
		"webpush-message key":    func(v *PushVector) { v.Request.JWT.Key = p256Priv("other").PublicKey().Bytes() },
		"webpush-message exp":    func(v *PushVector) { v.Request.JWT.WallClock["exp"] = 3600 },
		"webpush-message claim":  func(v *PushVector) { delete(v.Request.JWT.Claims, "sub") },
		"webpush-message urgent": func(v *PushVector) { v.Reason = "prekeys" },
		"fcm-message token":      func(v *PushVector) { v.Registration.Token = "another:token" },
	} {
		t.Run(name, func(t *testing.T) {
			file, _, _ := strings.Cut(name, " ")
			b, err := os.ReadFile(filepath.Join(KindPush, file+".json"))
			if err != nil {
				t.Fatal(err)
			}
			v := &PushVector{}
			if err := json.Unmarshal(b, v); err != nil {
				t.Fatal(err)
			}
			if got, err := v.Check(); got != ExpectValid {
				t.Fatalf("unchanged: %s (%v)", got, err)
			}
			mutate(v)
			if got, err := v.Check(); got != ErrRequestMismatch {
				t.Fatalf("changed: %s (%v), want %s", got, err, ErrRequestMismatch)
			} else {
				t.Log(err)
			}
		})
	}
}
