//! Every input limit of `domain::validation` at its edges: the value at the limit is
//! accepted, one past it refused with the exact error and field.

use taskpod_core::Error;
use taskpod_core::domain::validation::{
    ACTOR_ID_MAX_CHARS, CORRELATION_ID_MAX_CHARS, DESCRIPTION_MAX_BYTES, KIND_MAX_CHARS,
    METADATA_MAX_BYTES, PAYLOAD_MAX_BYTES, PRIORITY_MAX, PRIORITY_MIN, REASON_MAX_CHARS,
    REQUEST_ID_MAX_CHARS, TITLE_MAX_CHARS, validate_command, validate_context, validate_kind,
    validate_new_task,
};
use taskpod_core::domain::{Command, NewTask, Phase, RequestContext};

fn task() -> NewTask {
    NewTask::new("Write the tests", "manual")
}

fn with(change: impl FnOnce(&mut NewTask)) -> NewTask {
    let mut t = task();
    change(&mut t);
    t
}

fn ctx() -> RequestContext {
    RequestContext::new("alice")
}

#[track_caller]
fn assert_ok(result: Result<(), Error>) {
    if let Err(e) = result {
        panic!("expected Ok, got {e:?}");
    }
}

#[track_caller]
fn assert_invalid_title(result: Result<(), Error>) {
    let err = result.expect_err("an invalid title");
    assert!(matches!(err, Error::InvalidTitle(_)), "{err:?}");
    assert_eq!(err.field(), Some("title"));
    assert_eq!(err.reason(), "INVALID_TITLE");
}

#[track_caller]
fn assert_invalid_argument(result: Result<(), Error>, expected_field: &str) {
    let err = result.expect_err("an invalid argument");
    assert!(
        matches!(&err, Error::InvalidArgument { field, .. } if field == expected_field),
        "expected InvalidArgument on {expected_field}, got {err:?}"
    );
    assert_eq!(err.field(), Some(expected_field));
    assert_eq!(err.reason(), "INVALID_ARGUMENT");
}

/// A JSON string whose serialisation is exactly `bytes` long (two quotes included).
fn json_string_of(bytes: usize) -> serde_json::Value {
    let value = serde_json::Value::String("p".repeat(bytes - 2));
    assert_eq!(serde_json::to_vec(&value).expect("serialise").len(), bytes);
    value
}

/// A JSON object whose serialisation is exactly `bytes` long.
fn json_object_of(bytes: usize) -> serde_json::Value {
    // {"k":"..."} is 8 bytes around the value.
    let value = serde_json::json!({ "k": "m".repeat(bytes - 8) });
    assert_eq!(serde_json::to_vec(&value).expect("serialise").len(), bytes);
    value
}

// ---------------------------------------------------------------------------------------
// Title
// ---------------------------------------------------------------------------------------

#[test]
fn a_plain_task_is_valid() {
    assert_ok(validate_new_task(&task()));
}

#[test]
fn an_empty_title_is_refused() {
    assert_invalid_title(validate_new_task(&with(|t| t.title = String::new())));
}

#[test]
fn a_whitespace_only_title_is_refused() {
    for title in [" ", "   ", "\t", "\n\r\n", " \t \u{3000}\u{a0}"] {
        assert_invalid_title(validate_new_task(&with(|t| t.title = title.into())));
    }
}

#[test]
fn a_title_of_exactly_255_characters_is_accepted_even_when_multi_byte() {
    assert_eq!(TITLE_MAX_CHARS, 255);
    for c in ['a', 'é', '日', '🦀'] {
        let title: String = std::iter::repeat_n(c, TITLE_MAX_CHARS).collect();
        assert_eq!(title.chars().count(), 255);
        assert_ok(validate_new_task(&with(|t| t.title = title)));
    }
    // Padded with spaces: counted, not trimmed.
    let padded = format!(" {} ", "x".repeat(TITLE_MAX_CHARS - 2));
    assert_ok(validate_new_task(&with(|t| t.title = padded)));
}

#[test]
fn a_title_of_256_characters_is_refused() {
    for c in ['a', 'é', '日', '🦀'] {
        let title: String = std::iter::repeat_n(c, TITLE_MAX_CHARS + 1).collect();
        assert_invalid_title(validate_new_task(&with(|t| t.title = title)));
    }
    let padded = format!(" {} ", "x".repeat(TITLE_MAX_CHARS - 1));
    assert_invalid_title(validate_new_task(&with(|t| t.title = padded)));
}

#[test]
fn the_title_is_checked_before_every_other_field() {
    let everything_wrong = with(|t| {
        t.title = String::new();
        t.kind = "Bad Kind".into();
        t.priority = PRIORITY_MAX + 1;
        t.metadata = serde_json::json!([]);
    });
    assert_invalid_title(validate_new_task(&everything_wrong));
}

// ---------------------------------------------------------------------------------------
// Description, payload, metadata: sizes in bytes
// ---------------------------------------------------------------------------------------

#[test]
fn a_description_at_the_byte_limit_is_accepted() {
    assert_eq!(DESCRIPTION_MAX_BYTES, 64 * 1024);
    assert_ok(validate_new_task(&with(|t| {
        t.description = "d".repeat(DESCRIPTION_MAX_BYTES)
    })));
    // Two bytes a character: the limit is in bytes.
    let two_byte = "é".repeat(DESCRIPTION_MAX_BYTES / 2);
    assert_eq!(two_byte.len(), DESCRIPTION_MAX_BYTES);
    assert_ok(validate_new_task(&with(|t| t.description = two_byte)));
    assert_ok(validate_new_task(&with(|t| t.description = String::new())));
}

#[test]
fn a_description_one_byte_over_the_limit_is_refused() {
    assert_invalid_argument(
        validate_new_task(&with(|t| {
            t.description = "d".repeat(DESCRIPTION_MAX_BYTES + 1)
        })),
        "description",
    );
    // Fewer characters than the limit, more bytes.
    let multi_byte = format!("{}a", "é".repeat(DESCRIPTION_MAX_BYTES / 2));
    assert!(multi_byte.chars().count() < DESCRIPTION_MAX_BYTES);
    assert_invalid_argument(
        validate_new_task(&with(|t| t.description = multi_byte)),
        "description",
    );
}

#[test]
fn a_payload_at_the_serialised_size_limit_is_accepted() {
    assert_eq!(PAYLOAD_MAX_BYTES, 256 * 1024);
    assert_ok(validate_new_task(&with(|t| {
        t.payload = json_string_of(PAYLOAD_MAX_BYTES)
    })));
    // Any JSON is a payload: null, numbers, arrays, objects.
    for payload in [
        serde_json::Value::Null,
        serde_json::json!(42),
        serde_json::json!([1, 2, 3]),
        serde_json::json!({ "a": { "b": [] } }),
    ] {
        assert_ok(validate_new_task(&with(|t| t.payload = payload)));
    }
}

#[test]
fn a_payload_one_byte_over_the_limit_is_refused() {
    assert_invalid_argument(
        validate_new_task(&with(|t| t.payload = json_string_of(PAYLOAD_MAX_BYTES + 1))),
        "payload",
    );
}

#[test]
fn metadata_at_the_serialised_size_limit_is_accepted() {
    assert_eq!(METADATA_MAX_BYTES, 16 * 1024);
    assert_ok(validate_new_task(&with(|t| {
        t.metadata = json_object_of(METADATA_MAX_BYTES)
    })));
    assert_ok(validate_new_task(&with(|t| {
        t.metadata = serde_json::json!({})
    })));
}

#[test]
fn metadata_one_byte_over_the_limit_is_refused() {
    assert_invalid_argument(
        validate_new_task(&with(|t| {
            t.metadata = json_object_of(METADATA_MAX_BYTES + 1)
        })),
        "metadata",
    );
}

#[test]
fn metadata_that_is_not_an_object_is_refused() {
    for metadata in [
        serde_json::Value::Null,
        serde_json::json!("labels"),
        serde_json::json!(1),
        serde_json::json!(true),
        serde_json::json!([{ "k": "v" }]),
    ] {
        assert_invalid_argument(
            validate_new_task(&with(|t| t.metadata = metadata)),
            "metadata",
        );
    }
}

// ---------------------------------------------------------------------------------------
// Kind and priority
// ---------------------------------------------------------------------------------------

#[test]
fn kinds_of_lowercase_letters_digits_and_separators_are_accepted() {
    for kind in [
        "manual",
        "sleep",
        "exec",
        "a",
        "0",
        "my_kind-2.v1",
        "_-.",
        "x9",
    ] {
        assert_ok(validate_kind(kind));
        assert_ok(validate_new_task(&with(|t| t.kind = kind.into())));
    }
}

#[test]
fn a_kind_of_exactly_64_characters_is_accepted_and_65_refused() {
    assert_eq!(KIND_MAX_CHARS, 64);
    assert_ok(validate_kind(&"k".repeat(KIND_MAX_CHARS)));
    assert_invalid_argument(validate_kind(&"k".repeat(KIND_MAX_CHARS + 1)), "kind");
    assert_invalid_argument(
        validate_new_task(&with(|t| t.kind = "k".repeat(KIND_MAX_CHARS + 1))),
        "kind",
    );
}

#[test]
fn an_empty_kind_is_refused() {
    assert_invalid_argument(validate_kind(""), "kind");
    assert_invalid_argument(validate_new_task(&with(|t| t.kind = String::new())), "kind");
}

#[test]
fn kinds_with_uppercase_spaces_or_other_characters_are_refused() {
    for kind in [
        "Manual", "MANUAL", "my kind", " manual", "manual\n", "a/b", "a:b", "é", "日本", "ｍanual",
        "a+b", "a*",
    ] {
        assert_invalid_argument(validate_kind(kind), "kind");
        assert_invalid_argument(validate_new_task(&with(|t| t.kind = kind.into())), "kind");
    }
}

#[test]
fn priorities_at_the_bounds_are_accepted() {
    assert_eq!((PRIORITY_MIN, PRIORITY_MAX), (-1000, 1000));
    for priority in [
        PRIORITY_MIN,
        PRIORITY_MIN + 1,
        0,
        PRIORITY_MAX - 1,
        PRIORITY_MAX,
    ] {
        assert_ok(validate_new_task(&with(|t| t.priority = priority)));
    }
}

#[test]
fn priorities_past_the_bounds_are_refused() {
    for priority in [PRIORITY_MIN - 1, PRIORITY_MAX + 1, i32::MIN, i32::MAX] {
        assert_invalid_argument(
            validate_new_task(&with(|t| t.priority = priority)),
            "priority",
        );
    }
}

// ---------------------------------------------------------------------------------------
// Request context
// ---------------------------------------------------------------------------------------

#[test]
fn a_plain_context_is_valid() {
    assert_ok(validate_context(&ctx()));
    assert_ok(validate_context(
        &ctx().with_request_id("req-1").with_correlation_id("corr-1"),
    ));
}

#[test]
fn a_missing_actor_id_is_refused() {
    for actor in ["", " ", "\t\n"] {
        let context = RequestContext {
            actor_id: actor.into(),
            ..ctx()
        };
        let err = validate_context(&context).expect_err("actor_id is required");
        assert!(matches!(err, Error::MissingActorId), "{err:?}");
        assert_eq!(err.field(), Some("actor_id"));
        assert_eq!(err.reason(), "MISSING_ACTOR_ID");
    }
}

#[test]
fn an_actor_id_of_255_characters_is_accepted_and_256_refused() {
    assert_eq!(ACTOR_ID_MAX_CHARS, 255);
    for c in ['a', 'ü', '🦀'] {
        let at_limit: String = std::iter::repeat_n(c, ACTOR_ID_MAX_CHARS).collect();
        assert_ok(validate_context(&RequestContext::new(at_limit)));
        let over: String = std::iter::repeat_n(c, ACTOR_ID_MAX_CHARS + 1).collect();
        assert_invalid_argument(validate_context(&RequestContext::new(over)), "actor_id");
    }
}

#[test]
fn a_correlation_id_of_255_characters_is_accepted_and_256_refused() {
    assert_eq!(CORRELATION_ID_MAX_CHARS, 255);
    assert_ok(validate_context(
        &ctx().with_correlation_id("c".repeat(CORRELATION_ID_MAX_CHARS)),
    ));
    assert_invalid_argument(
        validate_context(&ctx().with_correlation_id("c".repeat(CORRELATION_ID_MAX_CHARS + 1))),
        "correlation_id",
    );
}

#[test]
fn a_causation_id_has_the_correlation_id_limit() {
    let with_causation = |id: String| RequestContext {
        causation_id: Some(id),
        ..ctx()
    };
    assert_ok(validate_context(&with_causation(
        "e".repeat(CORRELATION_ID_MAX_CHARS),
    )));
    assert_invalid_argument(
        validate_context(&with_causation("e".repeat(CORRELATION_ID_MAX_CHARS + 1))),
        "causation_id",
    );
}

#[test]
fn a_request_id_of_128_characters_is_accepted_and_129_refused() {
    assert_eq!(REQUEST_ID_MAX_CHARS, 128);
    assert_ok(validate_context(
        &ctx().with_request_id("r".repeat(REQUEST_ID_MAX_CHARS)),
    ));
    assert_ok(validate_context(
        &ctx().with_request_id("ü".repeat(REQUEST_ID_MAX_CHARS)),
    ));
    assert_invalid_argument(
        validate_context(&ctx().with_request_id("r".repeat(REQUEST_ID_MAX_CHARS + 1))),
        "request_id",
    );
}

#[test]
fn an_empty_request_id_is_refused_when_set() {
    assert_invalid_argument(validate_context(&ctx().with_request_id("")), "request_id");
}

#[test]
fn a_request_id_with_control_characters_is_refused() {
    for id in ["a\nb", "\0", "tab\there", "del\u{7f}", "c1\u{85}"] {
        assert_invalid_argument(validate_context(&ctx().with_request_id(id)), "request_id");
    }
}

#[test]
fn the_actor_id_is_checked_before_the_other_context_fields() {
    let context = RequestContext {
        actor_id: String::new(),
        ..ctx().with_request_id("")
    };
    assert!(matches!(
        validate_context(&context),
        Err(Error::MissingActorId)
    ));
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

#[test]
fn cancel_requires_a_reason() {
    for reason in ["", " ", "\n\t"] {
        let err = validate_command(&Command::Cancel {
            reason: reason.into(),
        })
        .expect_err("a reason is required");
        assert!(matches!(err, Error::MissingReason), "{err:?}");
        assert_eq!(err.field(), Some("reason"));
        assert_eq!(err.reason(), "MISSING_REASON");
    }
}

#[test]
fn a_cancel_reason_of_1024_characters_is_accepted_and_1025_refused() {
    assert_eq!(REASON_MAX_CHARS, 1024);
    for c in ['r', 'ß', '🦀'] {
        let at_limit: String = std::iter::repeat_n(c, REASON_MAX_CHARS).collect();
        assert_ok(validate_command(&Command::Cancel { reason: at_limit }));
        let over: String = std::iter::repeat_n(c, REASON_MAX_CHARS + 1).collect();
        assert_invalid_argument(
            validate_command(&Command::Cancel { reason: over }),
            "reason",
        );
    }
}

#[test]
fn a_stop_reason_is_optional_but_limited() {
    assert_ok(validate_command(&Command::RequestStop { reason: None }));
    assert_ok(validate_command(&Command::RequestStop {
        reason: Some(String::new()),
    }));
    assert_ok(validate_command(&Command::RequestStop {
        reason: Some("r".repeat(REASON_MAX_CHARS)),
    }));
    assert_invalid_argument(
        validate_command(&Command::RequestStop {
            reason: Some("r".repeat(REASON_MAX_CHARS + 1)),
        }),
        "reason",
    );
}

#[test]
fn commands_without_fields_are_always_valid() {
    for command in [
        Command::Complete,
        Command::RequestStart,
        Command::RequestRestart,
    ]
    .into_iter()
    .chain(Phase::ALL.iter().map(|&to| Command::TransitionPhase { to }))
    {
        assert_ok(validate_command(&command));
    }
}

#[test]
fn a_batch_item_error_names_the_field_of_its_cause() {
    let cause = validate_new_task(&with(|t| t.priority = PRIORITY_MAX + 1)).expect_err("invalid");
    let err = Error::InvalidBatchItem {
        index: 3,
        source: Box::new(cause),
    };
    assert_eq!(err.field(), Some("priority"));
    assert_eq!(err.reason(), "INVALID_BATCH_ITEM");
}

/// PostgreSQL text and jsonb cannot store U+0000: every text a client sends is refused
/// with its field named, instead of failing in the store as an internal error.
#[test]
fn nul_characters_are_refused_by_field() {
    assert_invalid_title(validate_new_task(&with(|t| t.title = "a\0b".into())));
    assert_invalid_argument(
        validate_new_task(&with(|t| t.description = "a\0b".into())),
        "description",
    );
    assert_invalid_argument(
        validate_new_task(&with(|t| t.payload = serde_json::json!({"deep": ["x\0"]}))),
        "payload",
    );
    assert_invalid_argument(
        validate_new_task(&with(|t| t.metadata = serde_json::json!({"k\0": 1}))),
        "metadata",
    );
    let mut c = ctx();
    c.actor_id = "al\0ice".into();
    assert_invalid_argument(validate_context(&c), "actor_id");
    let mut c = ctx();
    c.correlation_id = Some("c\0".into());
    assert_invalid_argument(validate_context(&c), "correlation_id");
    let mut c = ctx();
    c.causation_id = Some("c\0".into());
    assert_invalid_argument(validate_context(&c), "causation_id");
    assert_invalid_argument(
        validate_command(&Command::Cancel {
            reason: "no\0".into(),
        }),
        "reason",
    );
    assert_invalid_argument(
        validate_command(&Command::RequestStop {
            reason: Some("no\0".into()),
        }),
        "reason",
    );
    let err = taskpod_core::domain::filter::parse("kind = \"a\0\"").expect_err("refused");
    assert_eq!(err.field(), Some("filter"));
    // Other control characters are text like any other.
    assert_ok(validate_new_task(&with(|t| {
        t.description = "tab\there".into()
    })));
}
