//! Conversions at the edge between the wire and the domain.
//!
//! Wire -> domain conversions validate what the domain cannot express (an unknown enum
//! number, a malformed id or timestamp) and fail with `Error::InvalidArgument` naming
//! the field, so the API maps them like any other bad input.

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use taskpod_core::Error;
use taskpod_core::domain::{Event, NewTask, Phase, PodState, Status, Task, TaskId};
use taskpod_core::store::RecordedEvent;

use crate::v1;

/// The kind a task gets when CreateTask names none: the seed's human-in-the-loop flow.
pub const DEFAULT_KIND: &str = "manual";

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a task id sent by a client.
///
/// # Errors
/// `InvalidArgument` on `field` when it is not a UUID.
pub fn task_id(field: &str, raw: &str) -> Result<TaskId, Error> {
    if raw.is_empty() {
        return Err(invalid(field, "is required"));
    }
    raw.parse()
        .map_err(|_| invalid(field, format!("{raw:?} is not a UUID")))
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// # Errors
/// `InvalidArgument` on `field` for a timestamp outside chrono's range.
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Error> {
    let nanos = u32::try_from(t.nanos).map_err(|_| invalid(field, "negative nanos"))?;
    DateTime::from_timestamp(t.seconds, nanos).ok_or_else(|| invalid(field, "out of range"))
}

pub fn status(s: Status) -> v1::TaskStatus {
    match s {
        Status::Inactive => v1::TaskStatus::Inactive,
        Status::Active => v1::TaskStatus::Active,
        Status::Completed => v1::TaskStatus::Completed,
        Status::Cancelled => v1::TaskStatus::Cancelled,
        Status::Failed => v1::TaskStatus::Failed,
    }
}

/// # Errors
/// `InvalidArgument` on `field` for UNSPECIFIED or an unknown number.
pub fn from_status(field: &str, raw: i32) -> Result<Status, Error> {
    match v1::TaskStatus::try_from(raw) {
        Ok(v1::TaskStatus::Inactive) => Ok(Status::Inactive),
        Ok(v1::TaskStatus::Active) => Ok(Status::Active),
        Ok(v1::TaskStatus::Completed) => Ok(Status::Completed),
        Ok(v1::TaskStatus::Cancelled) => Ok(Status::Cancelled),
        Ok(v1::TaskStatus::Failed) => Ok(Status::Failed),
        Ok(v1::TaskStatus::Unspecified) | Err(_) => {
            Err(invalid(field, format!("{raw} is not a task status")))
        }
    }
}

pub fn phase(p: Phase) -> v1::TaskPhase {
    match p {
        Phase::SpecClarification => v1::TaskPhase::SpecClarification,
        Phase::Planning => v1::TaskPhase::Planning,
        Phase::Development => v1::TaskPhase::Development,
        Phase::Review => v1::TaskPhase::Review,
        Phase::Completed => v1::TaskPhase::Completed,
        Phase::Cancelled => v1::TaskPhase::Cancelled,
        Phase::Failed => v1::TaskPhase::Failed,
    }
}

/// # Errors
/// `InvalidArgument` on `field` for UNSPECIFIED or an unknown number.
pub fn from_phase(field: &str, raw: i32) -> Result<Phase, Error> {
    match v1::TaskPhase::try_from(raw) {
        Ok(v1::TaskPhase::SpecClarification) => Ok(Phase::SpecClarification),
        Ok(v1::TaskPhase::Planning) => Ok(Phase::Planning),
        Ok(v1::TaskPhase::Development) => Ok(Phase::Development),
        Ok(v1::TaskPhase::Review) => Ok(Phase::Review),
        Ok(v1::TaskPhase::Completed) => Ok(Phase::Completed),
        Ok(v1::TaskPhase::Cancelled) => Ok(Phase::Cancelled),
        Ok(v1::TaskPhase::Failed) => Ok(Phase::Failed),
        Ok(v1::TaskPhase::Unspecified) | Err(_) => {
            Err(invalid(field, format!("{raw} is not a task phase")))
        }
    }
}

pub fn pod_state(p: PodState) -> v1::PodState {
    match p {
        PodState::None => v1::PodState::None,
        PodState::Starting => v1::PodState::Starting,
        PodState::Running => v1::PodState::Running,
        PodState::Stopping => v1::PodState::Stopping,
    }
}

/// A domain task as the wire shows it.
pub fn task(t: &Task) -> v1::Task {
    let pod = t.pod.as_ref();
    let running = pod.is_some_and(|p| p.state == PodState::Running);
    v1::Task {
        task_id: t.task_id.to_string(),
        title: t.title.clone(),
        description: t.description.clone(),
        kind: t.kind.clone(),
        payload: Some(json_to_value(&t.payload)),
        metadata: json_to_struct(&t.metadata),
        priority: t.priority,
        status: status(t.status) as i32,
        phase: phase(t.phase) as i32,
        last_error: t.last_error.clone().unwrap_or_default(),
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
        created_by: t.created_by.clone(),
        version: t.version,
        pod_status: if running {
            v1::PodStatus::Running
        } else {
            v1::PodStatus::Stopped
        } as i32,
        pod_state: pod_state(pod.map_or(PodState::None, |p| p.state)) as i32,
        pod_node: pod
            .and_then(|p| p.node)
            .map(|n| n.to_string())
            .unwrap_or_default(),
        pod_epoch: pod.map_or(0, |p| p.epoch),
        pod_started_at: pod.and_then(|p| p.started_at).map(timestamp),
        partition: t.partition,
    }
}

/// A stored event as the wire shows it.
pub fn event(e: &RecordedEvent) -> v1::Event {
    let data = e
        .event
        .to_parts()
        .map(|(_, data)| data)
        .unwrap_or(serde_json::Value::Null);
    v1::Event {
        task_id: e.task_id.to_string(),
        version: e.version,
        r#type: e.event.type_name().to_owned(),
        data: json_to_struct(&data),
        actor_id: e.metadata.actor_id.clone(),
        correlation_id: e.metadata.correlation_id.clone(),
        causation_id: e.metadata.causation_id.clone().unwrap_or_default(),
        traceparent: e.metadata.traceparent.clone().unwrap_or_default(),
        epoch: e.metadata.epoch.unwrap_or_default(),
        recorded_at: Some(timestamp(e.recorded_at)),
    }
}

/// Rebuilds the domain event of a wire event (for clients that act on history).
///
/// # Errors
/// `InvalidArgument` on `event` when the type or data is unknown.
pub fn from_event(e: &v1::Event) -> Result<Event, Error> {
    let data = e
        .data
        .as_ref()
        .map_or(serde_json::Value::Null, struct_to_json);
    Event::from_parts(&e.r#type, data).map_err(|err| invalid("event", err.to_string()))
}

/// A task spec from the wire. The domain validates the rest.
///
/// # Errors
/// `InvalidArgument` on `metadata` when it holds a number JSON cannot represent.
pub fn new_task(spec: &v1::TaskSpec) -> Result<NewTask, Error> {
    let kind = if spec.kind.is_empty() {
        DEFAULT_KIND.to_owned()
    } else {
        spec.kind.clone()
    };
    Ok(NewTask {
        title: spec.title.clone(),
        description: spec.description.clone(),
        kind,
        payload: spec
            .payload
            .as_ref()
            .map_or(serde_json::Value::Null, value_to_json),
        priority: spec.priority,
        metadata: spec.metadata.as_ref().map_or_else(
            || serde_json::Value::Object(Default::default()),
            struct_to_json,
        ),
        auto_start: spec.auto_start,
    })
}

/// A domain new task as a wire spec (for clients).
pub fn task_spec(t: &NewTask) -> v1::TaskSpec {
    v1::TaskSpec {
        title: t.title.clone(),
        description: t.description.clone(),
        kind: t.kind.clone(),
        payload: Some(json_to_value(&t.payload)),
        priority: t.priority,
        metadata: json_to_struct(&t.metadata),
        auto_start: t.auto_start,
    }
}

/// JSON as `google.protobuf.Value`. Numbers become doubles, as the well-known type
/// defines them: integers beyond 2^53 lose precision.
pub fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as `google.protobuf.Struct`; `None` for anything else.
pub fn json_to_struct(v: &serde_json::Value) -> Option<prost_types::Struct> {
    match json_to_value(v).kind {
        Some(Kind::StructValue(s)) => Some(s),
        _ => None,
    }
}

/// `google.protobuf.Value` as JSON. Whole doubles become integers again; NaN and
/// infinities, which JSON cannot hold, become null.
pub fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn number(n: f64) -> serde_json::Value {
    // 2^53: past it a double no longer holds every integer.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= EXACT {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            (-1_000_000i64..1_000_000).prop_map(serde_json::Value::from),
            "[a-z ]{0,8}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{1,5}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn json_survives_the_wire(v in json()) {
            prop_assert_eq!(value_to_json(&json_to_value(&v)), v);
        }

        #[test]
        fn statuses_and_phases_round_trip(i in 0usize..5, j in 0usize..7) {
            let s = Status::ALL[i];
            prop_assert_eq!(from_status("s", status(s) as i32).ok(), Some(s));
            let p = Phase::ALL[j];
            prop_assert_eq!(from_phase("p", phase(p) as i32).ok(), Some(p));
        }
    }

    #[test]
    fn unspecified_enums_are_invalid_arguments() {
        let err = from_status("criteria.statuses", 0).unwrap_err();
        assert_eq!(err.field(), Some("criteria.statuses"));
        assert!(from_phase("to_phase", 99).is_err());
    }

    #[test]
    fn task_ids_must_be_uuids() {
        assert_eq!(task_id("task_id", "").unwrap_err().field(), Some("task_id"));
        assert_eq!(
            task_id("task_id", "nope").unwrap_err().field(),
            Some("task_id")
        );
        let id = TaskId::new();
        assert_eq!(task_id("task_id", &id.to_string()).unwrap(), id);
    }
}
