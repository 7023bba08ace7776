//! `idem demo`: the retry storm duplicates charges without idem and never with it.

use std::process::Command;

use idem_cli::demo::{DemoArgs, DemoError, run};

fn small(seed: u64) -> DemoArgs {
    DemoArgs {
        clients: 8,
        payments: 200,
        drop_rate: 0.3,
        seed,
        max_attempts: None,
        quiet: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idem_charges_each_payment_exactly_once_and_without_it_retries_duplicate() {
    let report = run(&small(7)).await.expect("the demo runs");

    let with = &report.with_idem;
    assert_eq!(with.payments, 200);
    assert_eq!(with.answered, 200, "every payment answered: {with:?}");
    assert_eq!(with.unanswered(), 0);
    assert_eq!(with.charges, 200, "one charge per payment: {with:?}");
    assert_eq!(with.charged_payments, 200);
    assert_eq!(with.duplicate_charges, 0, "{with:?}");
    assert!(with.lost_answers > 0, "the hop lost answers: {with:?}");
    assert!(
        with.attempts > with.payments,
        "lost answers were retried: {with:?}"
    );
    assert!(with.replays > 0, "retries got the stored answer: {with:?}");

    let without = &report.without_idem;
    assert_eq!(without.payments, 200);
    assert!(without.lost_answers > 0, "{without:?}");
    assert!(
        without.duplicate_charges > 0,
        "retries charge again: {without:?}"
    );
    // Every attempt that reached the upstream charged; the lost answers are duplicates.
    assert_eq!(
        without.charges,
        without.charged_payments + without.duplicate_charges
    );
    assert!(without.charges > without.payments);

    assert!(report.passed(), "{:?}", report.problems());
    let printed = report.to_string();
    for needle in [
        "without idem",
        "with idem",
        "payments",
        "intended",
        "attempts",
        "charges",
        "duplicate",
        "wall",
    ] {
        assert!(printed.contains(needle), "`{needle}` in:\n{printed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_losses_nothing_is_duplicated_either_way() {
    let args = DemoArgs {
        drop_rate: 0.0,
        payments: 50,
        ..small(3)
    };
    let report = run(&args).await.expect("the demo runs");
    for scenario in [&report.without_idem, &report.with_idem] {
        assert_eq!(scenario.attempts, 50, "{scenario:?}");
        assert_eq!(scenario.charges, 50, "{scenario:?}");
        assert_eq!(scenario.duplicate_charges, 0, "{scenario:?}");
    }
    assert!(report.passed());
}

#[tokio::test]
async fn an_out_of_range_drop_rate_is_refused_naming_the_flag() {
    let args = DemoArgs {
        drop_rate: 2.0,
        ..small(1)
    };
    match run(&args).await {
        Err(error @ DemoError::InvalidArgs { flag, .. }) => {
            assert_eq!(flag, "--drop-rate");
            assert!(error.to_string().contains("--drop-rate"), "{error}");
        }
        other => panic!("expected InvalidArgs, got {other:?}"),
    }
}

#[test]
fn the_binary_rejects_a_drop_rate_of_2_naming_the_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["demo", "--drop-rate", "2"])
        .output()
        .expect("run idem");
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--drop-rate"), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "nothing ran: {output:?}");
}

#[test]
fn the_binary_runs_a_small_demo_and_exits_zero() {
    let output = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args([
            "demo",
            "--clients",
            "4",
            "--payments",
            "60",
            "--drop-rate",
            "0.3",
            "--seed",
            "5",
        ])
        .output()
        .expect("run idem");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{output:?}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("with idem") && stdout.contains("duplicate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_or_an_unanswered_payment_with_idem_fails_the_demo() {
    let mut report = run(&DemoArgs {
        payments: 20,
        ..small(9)
    })
    .await
    .expect("the demo runs");
    assert!(report.passed());

    let mut leaky = report.clone();
    leaky.with_idem.charges += 1;
    leaky.with_idem.duplicate_charges = 1;
    leaky.with_idem.double_charged_payments = 1;
    assert!(!leaky.passed());
    assert!(
        leaky.problems()[0].contains("duplicate"),
        "{:?}",
        leaky.problems()
    );
    assert!(leaky.to_string().contains("FAILED"));

    report.with_idem.answered -= 1;
    report.with_idem.abandoned = 1;
    assert!(!report.passed());
    assert!(
        report.problems()[0].contains("no answer"),
        "{:?}",
        report.problems()
    );

    // Duplicates without idem are the point of the demo, not a failure.
    let mut expected = leaky.clone();
    expected.with_idem = expected.without_idem.clone();
    expected.with_idem.with_idem = true;
    expected.with_idem.duplicate_charges = 0;
    expected.with_idem.double_charged_payments = 0;
    expected.without_idem.duplicate_charges = 5;
    assert!(expected.passed(), "{:?}", expected.problems());
}
