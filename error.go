package userapi

import (
	"errors"
	"strings"
)

// The error vocabulary. Stores translate driver errors into these at their
// boundary; the HTTP layer maps each to one status in one table. Wrap them
// with %w so errors.Is keeps working.
var (
	ErrNotFound            = errors.New("user not found")
	ErrEmailTaken          = errors.New("email already in use")
	ErrVersionMismatch     = errors.New("version does not match")
	ErrIdempotencyMismatch = errors.New("idempotency key was used with a different request")
	// ErrUnavailable means the database (or another dependency needed to
	// answer) cannot be reached now; the request may be retried later.
	ErrUnavailable = errors.New("service unavailable")
	// ErrOverloaded means the database has as much work as it can take
	// without slowing everyone down (the load shedder's limit); the
	// request was not started and may be retried shortly.
	ErrOverloaded = errors.New("service overloaded")
	// ErrStaleSchema means the database schema is older than the code.
	ErrStaleSchema = errors.New("database schema is not up to date")
)

// FieldError is one problem with one input field.
type FieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// ValidationError lists every invalid field of an input.
type ValidationError struct {
	Fields []FieldError
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	b.WriteString("invalid input")
	for i, f := range e.Fields {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(f.Field)
		b.WriteString(" ")
		b.WriteString(f.Message)
	}
	return b.String()
}

func (e *ValidationError) add(field, msg string) {
	e.Fields = append(e.Fields, FieldError{Field: field, Message: msg})
}

func (e *ValidationError) orNil() error {
	if len(e.Fields) == 0 {
		return nil
	}
	return e
}
