package userapi_test

import (
	"testing"

	"userapi"
)

func TestPosition(t *testing.T) {
	for _, c := range []struct {
		p    userapi.Position
		text string
	}{
		{0, "0/0"},
		{0x16B374D848, "16/b374d848"},
		{1<<64 - 1, "ffffffff/ffffffff"},
	} {
		if got := c.p.String(); got != c.text {
			t.Errorf("%d.String() = %q, want %q", uint64(c.p), got, c.text)
		}
		got, err := userapi.ParsePosition(c.text)
		if err != nil || got != c.p {
			t.Errorf("ParsePosition(%q) = %v, %v; want %d", c.text, got, err, uint64(c.p))
		}
	}
	if got, err := userapi.ParsePosition("16/B374D848"); err != nil || got != 0x16B374D848 {
		t.Errorf("upper case: %v, %v", got, err)
	}
	for _, bad := range []string{"", "/", "1", "1/", "/1", "g/0", "100000000/0", "0/100000000", "+1/0", " 1/0"} {
		if _, err := userapi.ParsePosition(bad); err == nil {
			t.Errorf("ParsePosition(%q) succeeded", bad)
		}
	}
}
