//! `idem_http::path::normalize_path` on arbitrary text and on the paths of request targets
//! that `http::Uri` accepts: never panics, and whatever it accepts normalises to itself.
#![no_main]

use std::borrow::Cow;

use idem_http::path::normalize_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
    // What the layer really gets: the path of a parsed request target.
    if let Ok(uri) = http::Uri::try_from(data) {
        check(uri.path());
    }
});

fn check(raw: &str) {
    let once = match normalize_path(raw) {
        Ok(path) => path,
        Err(err) => {
            assert!(!err.reason().is_empty());
            return;
        }
    };
    assert!(
        once.starts_with('/') || once == "*",
        "{raw:?} gave {once:?}"
    );
    assert!(!once.contains('%'), "{raw:?} gave {once:?}");
    assert_eq!(
        matches!(once, Cow::Borrowed(_)),
        !raw.contains('%'),
        "{raw:?}: borrowed exactly when nothing was decoded"
    );
    match normalize_path(&once) {
        Ok(Cow::Borrowed(twice)) => assert_eq!(twice, &*once, "{raw:?}"),
        other => panic!("{raw:?} gave {once:?}, which normalises to {other:?}"),
    }
}
