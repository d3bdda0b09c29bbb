package http

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// hRequestID is the request id header, in the form fasthttp normalizes
// header names to (so Peek finds what SetCanonical stored).
var hRequestID = []byte("X-Request-Id")

// maxRequestIDBytes bounds a client's X-Request-ID: enough for a UUID or a
// W3C trace id with some prefix, small enough for every log line.
const maxRequestIDBytes = 128

// requestIDs generates ids unique across instances and restarts with high
// probability: 48 random bits chosen at start, then a counter.
type requestIDs struct {
	prefix [12]byte // hex
	n      atomic.Uint64
}

func (r *requestIDs) init() {
	var b [6]byte
	rand.Read(b[:]) // never fails (crypto/rand panics instead)
	hex.Encode(r.prefix[:], b[:])
}

// setRequestID echoes a sane X-Request-ID from the client, or a new one.
func (s *Server) setRequestID(rc *fasthttp.RequestCtx) {
	if id := rc.Request.Header.PeekBytes(hRequestID); validRequestID(id) {
		rc.Response.Header.SetCanonical(hRequestID, id)
		return
	}
	var buf [len(s.requestID.prefix) + 1 + 16]byte
	b := append(buf[:0], s.requestID.prefix[:]...)
	b = append(b, '-')
	b = strconv.AppendUint(b, s.requestID.n.Add(1), 16)
	rc.Response.Header.SetCanonical(hRequestID, b)
}

// validRequestID accepts 1..128 bytes of letters, digits and -_.:/+=@,
// which covers UUIDs, trace ids and base64, and keeps logs and headers
// free of anything that needs quoting.
func validRequestID(id []byte) bool {
	if len(id) == 0 || len(id) > maxRequestIDBytes {
		return false
	}
	for _, c := range id {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '-', c == '_', c == '.', c == ':', c == '/', c == '+', c == '=', c == '@':
		default:
			return false
		}
	}
	return true
}

func requestID(rc *fasthttp.RequestCtx) string {
	return string(rc.Response.Header.PeekBytes(hRequestID))
}

// gzipBody compresses the response body with fasthttp's pooled writers.
// BestSpeed: on a CPU-bound box the cycles matter more than the last few
// percent of size; JSON lists compress about 5× even so.
var gzipBody = fasthttp.CompressHandlerLevel(func(*fasthttp.RequestCtx) {}, fasthttp.CompressBestSpeed)

var strGzip = []byte("gzip")

// compress gzips bodies of at least GzipMinBytes when the client accepts
// gzip (q=0 refuses it); smaller ones are sent as they are.
func (s *Server) compress(rc *fasthttp.RequestCtx) {
	if len(rc.Response.Body()) < s.opts.GzipMinBytes || !rc.Request.Header.HasAcceptEncodingBytes(strGzip) {
		return
	}
	gzipBody(rc)
}

// recovered answers a request whose handler panicked with a 500 and logs
// the panic with its stack.
func (s *Server) recovered(rc *fasthttp.RequestCtx, v any) {
	id := append([]byte(nil), rc.Response.Header.PeekBytes(hRequestID)...)
	s.log.Error("panic serving request", s.requestAttrs(rc,
		slog.String("panic", fmt.Sprint(v)),
		slog.String("stack", string(debug.Stack())))...)
	rc.Response.Reset()
	rc.Response.Header.SetCanonical(hRequestID, id)
	s.writeProblem(rc, internalProblem())
}

// logRequest writes one line per request at debug level.
func (s *Server) logRequest(rc *fasthttp.RequestCtx, ep *endpoint, elapsed time.Duration) {
	if !s.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	s.log.Debug("request", s.requestAttrs(rc,
		slog.String("route", ep.metrics.route),
		slog.Int("status", rc.Response.StatusCode()),
		slog.Duration("duration", elapsed),
		slog.Int("bytes", len(rc.Response.Body())))...)
}

// requestAttrs are the attributes of every log line about a request.
func (s *Server) requestAttrs(rc *fasthttp.RequestCtx, extra ...any) []any {
	return append([]any{
		slog.String("request_id", requestID(rc)),
		slog.String("method", string(rc.Method())),
		slog.String("path", string(rc.URI().PathOriginal())), // as routed
		slog.String("client", s.clientAddr(rc).String()),
	}, extra...)
}

// clientAddr is the peer address, or, when the peer is a trusted proxy,
// the nearest address in X-Forwarded-For that is not a trusted proxy
// (walking from the right, as each proxy appends its peer). Entries left of
// an untrusted hop may be forged by the client and are ignored.
func (s *Server) clientAddr(rc *fasthttp.RequestCtx) netip.Addr {
	peer, _ := netip.AddrFromSlice(rc.RemoteIP())
	peer = peer.Unmap()
	if !s.trusted(peer) {
		return peer
	}
	var hops []string
	for _, v := range rc.Request.Header.PeekAll("X-Forwarded-For") {
		for h := range strings.SplitSeq(string(v), ",") {
			hops = append(hops, strings.TrimSpace(h))
		}
	}
	client := peer
	for i := len(hops) - 1; i >= 0; i-- {
		a, err := netip.ParseAddr(hops[i])
		if err != nil {
			break // a garbled hop: keep the last address we could trust
		}
		client = a.Unmap()
		if !s.trusted(client) {
			break
		}
	}
	return client
}

func (s *Server) trusted(a netip.Addr) bool {
	for _, p := range s.opts.TrustedProxies {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// serveParseError answers requests fasthttp could not read: a body over
// MaxBodyBytes (413), headers over the read buffer (431), a read timeout
// (408), or malformed HTTP (400). fasthttp closes the connection after.
func (s *Server) serveParseError(rc *fasthttp.RequestCtx, err error) {
	s.setRequestID(rc)
	p := problem{Status: fasthttp.StatusBadRequest, Detail: "The request is not valid HTTP/1.1."}
	var small *fasthttp.ErrSmallBuffer
	var timeout interface{ Timeout() bool }
	switch {
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		p = tooLarge(s.opts.MaxBodyBytes)
	case errors.As(err, &small):
		p = problem{Status: fasthttp.StatusRequestHeaderFieldsTooLarge, Detail: "The request headers are too large."}
	case errors.As(err, &timeout) && timeout.Timeout():
		p = problem{Status: fasthttp.StatusRequestTimeout, Detail: "The request was not received in time."}
	}
	s.writeProblem(rc, p)
	ep := s.endpoint(rc)
	ep.metrics.observe(p.Status, time.Since(rc.Time()))
}
