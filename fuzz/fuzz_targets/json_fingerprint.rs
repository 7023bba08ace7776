//! The JSON side of the request fingerprint (`idem_http::fingerprint`): `canonical_json` of
//! arbitrary bodies with `json_ignore` pointers never panics, gives JSON, gives the same
//! text every time, and (for documents without floating-point numbers, which serde_json's
//! default parser may round differently on the way back) is a fixed point; and gives
//! exactly what the long way through a `serde_json::Value` gives (`canonical_json` takes a
//! shortcut for documents already in canonical form).
//!
//! Input: pointers, one a line, then a NUL byte, then the body. Without a NUL byte the
//! whole input is the body and there are no pointers.
#![no_main]

use idem_http::fingerprint::{JsonPointer, canonical_json, canonical_json_via_value};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let (pointer_text, body) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (&[][..], data),
    };
    let pointers: Vec<JsonPointer> = String::from_utf8_lossy(pointer_text)
        .lines()
        .filter_map(|line| {
            let pointer = JsonPointer::parse(line).ok()?;
            assert_eq!(pointer.as_str(), line);
            assert_eq!(JsonPointer::parse(pointer.as_str()).as_ref(), Ok(&pointer));
            Some(pointer)
        })
        .collect();

    assert_eq!(
        canonical_json(body, &pointers),
        canonical_json_via_value(body, &pointers),
        "the shortcut and the long way disagree"
    );
    let Some(canonical) = canonical_json(body, &pointers) else {
        assert!(
            serde_json::from_slice::<Value>(body).is_err(),
            "JSON refused"
        );
        return;
    };
    assert_eq!(canonical_json(body, &pointers).as_ref(), Some(&canonical));
    let value: Value = serde_json::from_str(&canonical).expect("canonical text is JSON");
    if !has_float(&value) {
        // Ignored members are gone, so ignoring them again changes nothing.
        assert_eq!(
            canonical_json(canonical.as_bytes(), &pointers).as_ref(),
            Some(&canonical)
        );
        assert_eq!(
            canonical_json(canonical.as_bytes(), &[]).as_ref(),
            Some(&canonical)
        );
        // Layout does not matter: the pretty-printed document has the same form.
        let pretty = serde_json::to_string_pretty(&value).expect("a Value always prints");
        assert_eq!(
            canonical_json(pretty.as_bytes(), &[]).as_ref(),
            Some(&canonical)
        );
    }
});

fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}
