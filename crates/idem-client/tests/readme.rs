//! The README's client example is `examples/payment.rs`, which cargo compiles; this keeps
//! the two the same text. (The README's Rust blocks are otherwise doctests of idem-http,
//! which cannot see this crate, so that block is marked `ignore` there.)

#[test]
fn the_readme_shows_the_compiled_example() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/payment.rs");
    let section = readme
        .split("\n## The client")
        .nth(1)
        .expect("the README has a section `## The client`");
    let block = section
        .split("```rust,ignore\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a rust block in the client section");
    assert_eq!(
        block.trim_end(),
        example.trim_end(),
        "copy examples/payment.rs into the README's client section"
    );
}
