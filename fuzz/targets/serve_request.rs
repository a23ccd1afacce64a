//! The server's request parsing: the body of a chat completion and of a completion.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = nibble_serve::request::parse(data, true);
        let _ = nibble_serve::request::parse(data, false);
    });
}
