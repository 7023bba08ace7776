//! `idem_core::Key::parse` and `parse_with_max_len` on arbitrary header values: never panic, and
//! every key they accept is 1 to `max_len` printable ASCII characters that `Key::new`
//! accepts as the same key.
#![no_main]

use idem_core::{DEFAULT_MAX_KEY_LEN, Key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data, DEFAULT_MAX_KEY_LEN, Key::parse(data));
    // The first byte picks a length limit, including the extremes.
    if let Some((&first, value)) = data.split_first() {
        let max_len = match first {
            0xFF => usize::MAX,
            n => usize::from(n),
        };
        check(value, max_len, Key::parse_with_max_len(value, max_len));
    }
});

fn check(value: &[u8], max_len: usize, parsed: Result<Key, idem_core::KeyError>) {
    let key = match parsed {
        Ok(key) => key,
        Err(err) => {
            // Every refusal can be shown to the client.
            let _ = err.to_string();
            return;
        }
    };
    let text = key.as_str();
    assert!(!text.is_empty(), "empty key from {value:?}");
    assert!(
        text.len() <= max_len,
        "{text:?} is over {max_len} from {value:?}"
    );
    assert!(
        text.bytes().all(|b| (0x20..=0x7e).contains(&b)),
        "{text:?} is not printable ASCII, from {value:?}"
    );
    assert_eq!(
        Key::new_with_max_len(text, max_len).as_ref(),
        Ok(&key),
        "the key's own text is not the same key, from {value:?}"
    );
    // A bare key (not starting with `"`) is its own header value.
    if !text.starts_with('"') && text.trim_ascii() == text {
        assert_eq!(
            Key::parse_with_max_len(text.as_bytes(), max_len).as_ref(),
            Ok(&key)
        );
    }
}
