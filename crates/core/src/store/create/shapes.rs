//! The transactions `taskpod bench limit` drives Postgres with (pgbench scripts), on
//! copies of our tables, so BENCHMARKS.md can give each figure as a share of what
//! Postgres itself does on the machine. They live beside the create path because one
//! of them is the create: its script is built from the store's own statement
//! (`create::rows`), so a change to that statement changes what limit times, and a
//! change this module cannot follow (a column it has no value for, a table it does not
//! copy) fails [`shapes`] and its tests rather than leaving a stale copy behind.
//!
//! The copies live in a scratch schema, [`SCHEMA`], which [`SETUP`] creates (same
//! columns, indexes, storage parameters, foreign keys and events partitioning as ours)
//! and [`TEARDOWN`] drops. Ids are time-ordered like UUIDv7: Postgres 15 has no
//! `uuidv7()`, so two functions make them, the millisecond clock in the first 48 bits.

use super::rows::{STATEMENT, created_event};
use crate::domain::{EventMetadata, NewTask, TaskId, TaskState};
use crate::error::Error;
use crate::store::writes::metadata_json;

/// The scratch schema, created and dropped by each run.
pub const SCHEMA: &str = "taskpod_limit";

/// Creates the scratch schema: copies of our tables, with what `LIKE` leaves out added
/// back: storage parameters (fillfactor) and foreign keys between the tables, read from
/// the catalog so that they follow the migrations, and the events partitioning; and the
/// id functions: `uuid7()` (random bits after the clock) and `uuid7(r)` (the bits of `r`
/// and the backend after the clock of the statement, so every use in one statement
/// gives the same id).
pub const SETUP: &str = r#"
DROP SCHEMA IF EXISTS taskpod_limit CASCADE;
CREATE SCHEMA taskpod_limit;
CREATE FUNCTION taskpod_limit.uuid7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(overlay(uuid_send(gen_random_uuid())
                  PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                  FROM 1 FOR 6), 'hex')::uuid
$$;
CREATE FUNCTION taskpod_limit.uuid7(r bigint) RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT encode(substring(int8send((extract(epoch FROM statement_timestamp()) * 1000)::bigint) FROM 3)
                  || int8send(r) || substring(int4send(pg_backend_pid()) FROM 3), 'hex')::uuid
$$;
CREATE TABLE taskpod_limit.rows (
    id   uuid        PRIMARY KEY,
    at   timestamptz NOT NULL DEFAULT now(),
    data jsonb       NOT NULL
);
CREATE TABLE taskpod_limit.tasks (LIKE tasks INCLUDING ALL);
CREATE TABLE taskpod_limit.task_heads (LIKE task_heads INCLUDING ALL);
DO $$
DECLARE
    t  text;
    fk record;
BEGIN
    -- Storage parameters (the heads' fillfactor), as our tables have them now.
    FOREACH t IN ARRAY ARRAY['tasks', 'task_heads'] LOOP
        IF (SELECT reloptions FROM pg_class WHERE oid = t::regclass) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE taskpod_limit.%I SET (%s)', t,
                (SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = t::regclass));
        END IF;
    END LOOP;
    -- Foreign keys between them, as they are now.
    FOR fk IN SELECT c.relname AS tbl, r.relname AS ref, pg_get_constraintdef(k.oid) AS def
                FROM pg_constraint k
                JOIN pg_class c ON c.oid = k.conrelid
                JOIN pg_class r ON r.oid = k.confrelid
               WHERE k.contype = 'f'
                 AND k.conrelid IN ('tasks'::regclass, 'task_heads'::regclass)
                 AND k.confrelid IN ('tasks'::regclass, 'task_heads'::regclass) LOOP
        EXECUTE format('ALTER TABLE taskpod_limit.%I ADD %s', fk.tbl,
            regexp_replace(fk.def, 'REFERENCES [^(]+\(',
                           'REFERENCES taskpod_limit.' || quote_ident(fk.ref) || '('));
    END LOOP;
END
$$;
CREATE TABLE taskpod_limit.events (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (stream_id);
ALTER TABLE taskpod_limit.events ADD PRIMARY KEY (stream_id, version);
CREATE INDEX ON taskpod_limit.events (tx_id);
CREATE TABLE taskpod_limit.events_month PARTITION OF taskpod_limit.events FOR VALUES
    FROM (taskpod_uuid7_floor(date_trunc('month', now())))
    TO (taskpod_uuid7_floor(date_trunc('month', now()) + interval '1 month'));
CREATE TABLE taskpod_limit.events_default PARTITION OF taskpod_limit.events DEFAULT;
"#;

/// Drops the scratch schema.
pub const TEARDOWN: &str = "DROP SCHEMA IF EXISTS taskpod_limit CASCADE";

/// The tables [`SETUP`] copies: the only ones a shape may write.
const TABLES: [&str; 3] = ["tasks", "task_heads", "events"];

/// Who the shapes' rows are attributed to.
pub const ACTOR: &str = "taskpod-bench";
/// The one correlation id of every created row (a constant: the script is fixed).
const CORRELATION_ID: &str = "6f1c1d3e-8a53-4c4e-9a3c-2f0f5b1e7a10";
/// The partition every created row claims (ids are made in SQL, not hashed here).
const PARTITION: i32 = 7;
/// The pgbench variable the create's id is made from, set afresh by each transaction.
const ID_VARIABLE: &str = "r";
/// The id of a created row, the same wherever the statement names it.
const ID: &str = "taskpod_limit.uuid7(:r)";

/// One pgbench transaction shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Its figure's name (`pg_create`).
    pub name: &'static str,
    /// What one transaction is, for people.
    pub what: &'static str,
    /// The pgbench script: meta-commands and one SQL statement.
    pub script: String,
}

/// The shapes, in the order they are run.
///
/// # Errors
/// [`Error::Internal`] when the create statement has changed in a way the pgbench
/// script cannot follow (see the module docs).
pub fn shapes() -> Result<Vec<Shape>, Error> {
    Ok(vec![
        Shape {
            name: "pg_select_one",
            what: "pgbench: SELECT 1 (a round trip, no transaction to commit)",
            script: "SELECT 1;\n".into(),
        },
        Shape {
            name: "pg_insert_one",
            what: "pgbench: one-row insert (uuid key, jsonb), committed",
            script: "INSERT INTO taskpod_limit.rows (id, data) \
                     VALUES (taskpod_limit.uuid7(), '{\"actor_id\": \"taskpod-bench\"}');\n"
                .into(),
        },
        Shape {
            name: "pg_create",
            what: "pgbench: our create, one statement: tasks row, task_heads row, first event",
            script: create_script()?,
        },
    ])
}

/// The store's create statement for one task, on the scratch schema: each column
/// array becomes a one-element array of the value a `manual` task titled `limit`
/// created by [`ACTOR`] has there, and its id is made from a random pgbench variable.
///
/// # Errors
/// As [`shapes`].
pub fn create_script() -> Result<String, Error> {
    let values = Values::new()?;
    let inserts = inserts(STATEMENT)?;
    // Each parameter's value, checked to be the same wherever it is bound.
    let mut params: Vec<(u32, String)> = Vec::new();
    for insert in &inserts {
        for (column, param) in insert.columns.iter().zip(&insert.params) {
            let value = values.of(&insert.table, column)?;
            match params.iter().find(|(n, _)| *n == param.number) {
                Some((_, bound)) if *bound != value => {
                    return Err(changed(format!(
                        "${} stands for {}.{column} and for another column with another value",
                        param.number, insert.table
                    )));
                }
                Some(_) => {}
                None => params.push((param.number, value)),
            }
        }
    }
    let mut sql = substitute(STATEMENT, &params)?;
    for table in TABLES {
        sql = sql.replace(
            &format!("INSERT INTO {table} "),
            &format!("INSERT INTO {SCHEMA}.{table} "),
        );
    }
    check_pgbench_variables(&sql)?;
    Ok(format!(
        "\\set {ID_VARIABLE} random(0, 9223372036854775806)\n{};\n",
        sql.trim()
    ))
}

fn changed(what: String) -> Error {
    Error::Internal(format!(
        "the create statement changed and bench limit's pg_create cannot follow: {what} \
         (see store::create::shapes)"
    ))
}

/// An `INSERT INTO table (columns) SELECT * FROM UNNEST(params)` of the statement.
#[derive(Debug, PartialEq, Eq)]
struct Insert {
    table: String,
    columns: Vec<String>,
    params: Vec<Param>,
}

/// `$number::ty[]`.
#[derive(Debug, PartialEq, Eq)]
struct Param {
    number: u32,
    ty: String,
}

fn param(text: &str) -> Option<Param> {
    let (number, ty) = text.trim().strip_prefix('$')?.split_once("::")?;
    Some(Param {
        number: number.parse().ok()?,
        ty: ty.strip_suffix("[]")?.to_owned(),
    })
}

/// Text between `open` after `from` and the next `)`, and what follows it.
fn parenthesised<'a>(from: &'a str, open: &str) -> Option<(&'a str, &'a str)> {
    let rest = from.trim_start().strip_prefix(open)?;
    let end = rest.find(')')?;
    Some((&rest[..end], &rest[end + 1..]))
}

fn list(text: &str) -> Vec<String> {
    text.split(',').map(|s| s.trim().to_owned()).collect()
}

/// Every insert of `statement`, which must write only [`TABLES`] from column arrays
/// and read no table.
fn inserts(statement: &str) -> Result<Vec<Insert>, Error> {
    let upper = statement.to_uppercase();
    for word in ["UPDATE ", "DELETE ", "JOIN ", "MERGE "] {
        if upper.contains(word) {
            return Err(changed(format!("it has an {}", word.trim())));
        }
    }
    if upper.matches(" FROM ").count() != upper.matches(" FROM UNNEST(").count() {
        return Err(changed("it reads from a table".into()));
    }
    let mut inserts = Vec::new();
    for part in statement.split("INSERT INTO ").skip(1) {
        let table_end = part.find([' ', '(']).unwrap_or(part.len());
        let table = &part[..table_end];
        if !TABLES.contains(&table) {
            return Err(changed(format!(
                "it writes {table}, which limit does not copy"
            )));
        }
        let malformed = || changed(format!("its insert into {table} is not column arrays"));
        let (columns, rest) = parenthesised(&part[table_end..], "(").ok_or_else(malformed)?;
        let (params, _) = parenthesised(rest, "SELECT * FROM UNNEST(").ok_or_else(malformed)?;
        let columns = list(columns);
        let params = list(params)
            .iter()
            .map(|p| param(p))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(malformed)?;
        if columns.len() != params.len() {
            return Err(malformed());
        }
        inserts.push(Insert {
            table: table.to_owned(),
            columns,
            params,
        });
    }
    if inserts.is_empty() {
        return Err(changed("it has no insert".into()));
    }
    Ok(inserts)
}

/// `statement` with every `$n::ty[]` replaced by `ARRAY[value]::ty[]`.
fn substitute(statement: &str, params: &[(u32, String)]) -> Result<String, Error> {
    let mut out = String::with_capacity(statement.len() * 2);
    let mut rest = statement;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail.find("[]").map(|i| i + 2).unwrap_or(tail.len());
        let param = param(&tail[..end])
            .ok_or_else(|| changed(format!("it has a parameter {:?}", &tail[..end.min(20)])))?;
        let (_, value) = params
            .iter()
            .find(|(n, _)| *n == param.number)
            .ok_or_else(|| changed(format!("${} is bound outside the inserts", param.number)))?;
        out.push_str(&format!("ARRAY[{value}]::{}[]", param.ty));
        rest = &tail[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// pgbench reads `:name` anywhere in a script, quoted or not, as a variable: the only
/// one a script may hold is [`ID_VARIABLE`].
fn check_pgbench_variables(sql: &str) -> Result<(), Error> {
    let bytes = sql.as_bytes();
    let name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b':' {
            if bytes.get(i + 1) == Some(&b':') {
                i += 2;
                continue;
            }
            let name: String = bytes[i + 1..]
                .iter()
                .take_while(|b| name_char(**b))
                .map(|b| char::from(*b))
                .collect();
            if !name.is_empty() && name != ID_VARIABLE {
                return Err(changed(format!("pgbench would read :{name} as a variable")));
            }
        }
        i += 1;
    }
    Ok(())
}

/// A SQL string literal.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// JSON as a SQL literal, with a space after every colon (see
/// [`check_pgbench_variables`]).
fn json(value: &serde_json::Value) -> Result<String, Error> {
    #[derive(Debug)]
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
        ) -> std::io::Result<()> {
            writer.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    serde::Serialize::serialize(
        value,
        &mut serde_json::Serializer::with_formatter(&mut out, Spaced),
    )
    .map_err(|e| Error::Internal(format!("serialising {value}: {e}")))?;
    Ok(quoted(&String::from_utf8_lossy(&out)))
}

/// What the create writes for the one task of a pg_create transaction, column by
/// column, from the domain as `TaskColumns` builds it.
struct Values {
    task: NewTask,
    state: TaskState,
    event_type: &'static str,
    data: serde_json::Value,
    metadata: serde_json::Value,
}

impl Values {
    fn new() -> Result<Self, Error> {
        let task = NewTask::new("limit", "manual");
        let created = created_event(&task);
        let state = TaskState::genesis(TaskId::new(), &created)?;
        let (event_type, data) = created
            .to_parts()
            .map_err(|e| Error::Internal(format!("serialising task_created: {e}")))?;
        let metadata = metadata_json(&EventMetadata {
            actor_id: ACTOR.to_owned(),
            correlation_id: CORRELATION_ID.to_owned(),
            ..EventMetadata::default()
        })?;
        Ok(Self {
            task,
            state,
            event_type,
            data,
            metadata,
        })
    }

    /// The value of `table.column`, as SQL.
    fn of(&self, table: &str, column: &str) -> Result<String, Error> {
        let t = &self.task;
        Ok(match (table, column) {
            ("tasks", "task_id") | ("task_heads", "task_id") | ("events", "stream_id") => {
                ID.to_owned()
            }
            ("tasks", "title") => quoted(&t.title),
            ("tasks", "description") => quoted(&t.description),
            ("tasks", "kind") => quoted(&t.kind),
            ("tasks", "payload") => json(&t.payload)?,
            ("tasks", "metadata") => json(&t.metadata)?,
            ("tasks", "priority") => t.priority.to_string(),
            ("tasks", "partition") => PARTITION.to_string(),
            ("tasks", "created_by") => quoted(ACTOR),
            ("tasks", "status") | ("task_heads", "status") => quoted(self.state.status.as_str()),
            ("tasks", "phase") | ("task_heads", "phase") => quoted(self.state.phase.as_str()),
            ("task_heads", "version") => self.state.version.to_string(),
            ("task_heads", "traceparent") => "NULL".to_owned(),
            ("events", "version") => "1".to_owned(),
            ("events", "type") => quoted(self.event_type),
            ("events", "data") => json(&self.data)?,
            ("events", "metadata") => json(&self.metadata)?,
            _ => {
                return Err(changed(format!(
                    "it writes {table}.{column}, which pg_create has no value for"
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_has_a_unique_name_and_one_statement() {
        let shapes = shapes().unwrap();
        let mut names: Vec<_> = shapes.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), shapes.len());
        for shape in &shapes {
            assert_eq!(shape.script.matches(';').count(), 1, "{}", shape.name);
        }
    }

    #[test]
    fn the_create_script_is_the_statement_on_the_scratch_schema() {
        let script = create_script().unwrap();
        assert!(script.starts_with("\\set r random("), "{script}");
        assert!(!script.contains('$'), "every parameter bound: {script}");
        for table in TABLES {
            assert!(
                script.contains(&format!("INSERT INTO taskpod_limit.{table} ")),
                "{script}"
            );
            assert!(
                !script.contains(&format!("INSERT INTO {table} ")),
                "{script}"
            );
        }
        assert!(script.contains("ARRAY[taskpod_limit.uuid7(:r)]::uuid[]"));
        assert!(script.contains("ARRAY['manual']::text[]"), "{script}");
        assert!(script.contains("\"kind\": \"manual\""), "{script}");
        assert!(
            script.contains("\"actor_id\": \"taskpod-bench\""),
            "{script}"
        );
        // The statement's own tail (now() and the transaction's name) comes along.
        assert!(script.contains("pg_current_xact_id()"), "{script}");
    }

    #[test]
    fn a_statement_the_script_cannot_follow_is_refused() {
        let unknown =
            "INSERT INTO tasks (task_id, colour) SELECT * FROM UNNEST($1::uuid[], $2::text[])";
        assert!(inserts(unknown).is_ok());
        let values = Values::new().unwrap();
        assert!(values.of("tasks", "colour").is_err());
        assert!(inserts("INSERT INTO nodes (node_id) SELECT * FROM UNNEST($1::uuid[])").is_err());
        assert!(inserts("UPDATE tasks SET title = $1").is_err());
        assert!(
            inserts("INSERT INTO tasks (task_id) SELECT task_id FROM task_heads").is_err(),
            "reads a table"
        );
        assert!(substitute("SELECT $2::int8[]", &[(1, "1".into())]).is_err());
        assert!(check_pgbench_variables("SELECT '{\"a\":1}'").is_err());
        assert!(check_pgbench_variables("SELECT 1::int8, :r").is_ok());
    }

    #[test]
    fn parameters_are_read_with_their_types() {
        assert_eq!(
            param(" $13::uuid[]"),
            Some(Param {
                number: 13,
                ty: "uuid".into()
            })
        );
        assert_eq!(param("$1"), None);
        assert_eq!(
            substitute("x $1::int4[] y $1::int4[]", &[(1, "7".into())]).unwrap(),
            "x ARRAY[7]::int4[] y ARRAY[7]::int4[]"
        );
    }
}
