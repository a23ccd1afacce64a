//! Chat-template compiling and rendering: the input is the template; it renders a short
//! conversation with and without the generation prompt. Fuel and the output cap must end every
//! runaway template in an error.

use nibble_load::tokenizer::ChatTemplate;
use nibble_load::ChatMessage;

fn main() {
    let messages = [
        ChatMessage::new("system", "You are helpful."),
        ChatMessage::new("user", "Hi {{ there }}"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Bye"),
    ];
    // Without afl's abort-on-panic hook: `ChatTemplate::render` catches the template engine's
    // own panics (its integer overflows) and returns them as errors, as users get them; any
    // panic that escapes still aborts (afl's loop catches it and aborts).
    afl::fuzz_nohook!(|data: &[u8]| {
        let Ok(source) = std::str::from_utf8(data) else { return };
        let Ok(t) = ChatTemplate::new(source.to_string()) else { return };
        let _ = t.render(&messages, true, "<s>", "</s>");
        let _ = t.render(&messages[..1], false, "", "");
    });
}
