//! Attacks through the transport: stalled HTTP/2 streams, idle TLS handshakes.
