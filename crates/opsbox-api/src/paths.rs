//! Percent-encoding of URL path segments, shared by the client (which builds
//! `/v1/jobs/{name}` paths) and the server (which writes result URLs in answers).

/// Characters kept as they are in a path segment: RFC 3986 "unreserved". Everything
/// else, including the `@` and `:` of job names and `/`, is percent-encoded.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one path segment (a script, job, user or token name).
pub fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// Percent-encodes a `/`-separated relative path segment by segment, keeping the `/`.
pub fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}
