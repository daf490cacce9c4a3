//! Filter strings for ListTasks, CountTasks and WatchTasks: a subset of
//! [AIP-160](https://google.aip.dev/160), parsed into a typed [`FilterExpr`] that the
//! store compiles to SQL and watch streams evaluate in memory ([`FilterExpr::matches`]).
//!
//! # Grammar
//!
//! ```text
//! filter     = [ expression ] ;                       (* empty or blank: no filter *)
//! expression = sequence { "AND" sequence } ;
//! sequence   = factor { factor } ;                    (* juxtaposition means AND *)
//! factor     = term { "OR" term } ;
//! term       = [ "NOT" | "-" ] simple ;
//! simple     = comparison | "(" expression ")" ;
//! comparison = field operator value ;
//! field      = "status" | "phase" | "kind" | "created_by"
//!            | "created_at" | "updated_at" | "priority" ;
//! operator   = "=" | "!=" | "<" | "<=" | ">" | ">=" ;
//! value      = string | word ;
//! string     = '"' { character | escape } '"'
//!            | "'" { character | escape } "'" ;
//! escape     = "\" ( "\" | '"' | "'" | "n" | "r" | "t" ) ;
//! word       = ( letter | digit | "_" | "-" digit ) { letter | digit | "_" | "." | "-" | "@" } ;
//! ```
//!
//! - **Precedence**, tightest first: `NOT`/`-`, then `OR`, then juxtaposition and `AND`
//!   (both mean AND). As in AIP-160 and unlike SQL, **`OR` binds tighter than `AND`**:
//!   `a AND b OR c` means `a AND (b OR c)`, and `a b OR c` means `a AND (b OR c)`. Use
//!   parentheses to say otherwise.
//! - `NOT x` and `-x` both negate; they apply to one comparison or one parenthesised
//!   expression (`NOT NOT x` is written `NOT (NOT x)`). `-` must touch what it negates.
//! - Keywords `AND`, `OR`, `NOT` are upper case; field names and enum values are lower
//!   case. All matching is case-sensitive.
//! - Whitespace (any Unicode white space) separates tokens and is otherwise ignored;
//!   `status=active` and `status = active` are the same.
//! - A keyword cannot be a bare value: quote it (`created_by = "AND"`).
//!
//! # Fields
//!
//! | field | operators | value |
//! | --- | --- | --- |
//! | `status` | `=` `!=` | `inactive`, `active`, `completed`, `cancelled`, `failed` |
//! | `phase` | `=` `!=` | `spec_clarification`, `planning`, `development`, `review`, `completed`, `cancelled`, `failed` |
//! | `kind` | `=` `!=` | text (exact match) |
//! | `created_by` | `=` `!=` | text (exact match) |
//! | `created_at` | all six | an RFC 3339 timestamp in quotes, e.g. `"2024-05-01T12:00:00Z"` |
//! | `updated_at` | all six | the same; it is the time of the last lifecycle change |
//! | `priority` | all six | an integer without quotes, e.g. `-5` |
//!
//! Enum and text values may be quoted or bare words. Text matches exactly: no
//! wildcards, no case folding, and a string must not contain the NUL character.
//! Timestamps may carry any offset (stored in UTC) and are kept to the microsecond
//! (Postgres's precision; finer digits are truncated); a leap second `:60` becomes the
//! next second's start, as in Postgres.
//!
//! # Limits
//!
//! A filter is at most [`MAX_BYTES`] (2048) bytes long, nests parentheses at most
//! [`MAX_DEPTH`] (32) deep and holds at most [`MAX_COMPARISONS`] (64) comparisons.
//!
//! # Errors
//!
//! Every error is [`Error::InvalidArgument`] on the field `filter`, with a reason that
//! starts with the byte offset where the problem was found (counted from 0) and says
//! what was expected, e.g. `at 16: unknown field "colour"; filterable fields are
//! status, phase, kind, created_by, created_at, updated_at, priority`.
//!
//! # Canonical form
//!
//! [`FilterExpr`]'s `Display` writes a canonical string that [`parse`] reads back into
//! an equal expression: single spaces around operators and keywords, `NOT` for
//! negation, text and timestamps in double quotes (timestamps in UTC), parentheses only
//! where the structure needs them. This holds for every expression `parse` returns; an
//! expression built in code must, like parsed ones, give `And` and `Or` at least two
//! operands, values of its field's type and timestamps in whole microseconds.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, SecondsFormat, SubsecRound, TimeDelta, Timelike, Utc};
use serde::{Deserialize, Serialize};

use super::status::{Phase, Status};
use super::task::Task;
use crate::error::Error;

/// The longest filter accepted, in bytes.
pub const MAX_BYTES: usize = 2048;
/// How deep parentheses may nest.
pub const MAX_DEPTH: usize = 32;
/// The most comparisons one filter may hold.
pub const MAX_COMPARISONS: usize = 64;

/// A parsed filter. Built by [`parse`]; see the module docs for the grammar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterExpr {
    /// Every operand matches (an empty list matches everything).
    And(Vec<FilterExpr>),
    /// Some operand matches (an empty list matches nothing).
    Or(Vec<FilterExpr>),
    Not(Box<FilterExpr>),
    /// `field op value`. A comparison whose operator the field does not allow, or
    /// whose value is not of the field's type, matches nothing; `parse` never builds
    /// one.
    Compare {
        field: FilterField,
        op: CompareOp,
        value: FilterValue,
    },
}

/// A field a filter may compare, by its wire name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterField {
    Status,
    Phase,
    Kind,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
    Priority,
}

impl FilterField {
    /// Every field, in the order the docs list them.
    pub const ALL: &'static [FilterField] = &[
        FilterField::Status,
        FilterField::Phase,
        FilterField::Kind,
        FilterField::CreatedBy,
        FilterField::CreatedAt,
        FilterField::UpdatedAt,
        FilterField::Priority,
    ];

    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            FilterField::Status => "status",
            FilterField::Phase => "phase",
            FilterField::Kind => "kind",
            FilterField::CreatedBy => "created_by",
            FilterField::CreatedAt => "created_at",
            FilterField::UpdatedAt => "updated_at",
            FilterField::Priority => "priority",
        }
    }

    /// The field with this wire name.
    pub fn from_name(name: &str) -> Option<FilterField> {
        FilterField::ALL
            .iter()
            .copied()
            .find(|f| f.as_str() == name)
    }

    /// Whether values of this field are ordered (all six operators) rather than only
    /// compared for equality (`=` and `!=`).
    pub fn is_ordered(&self) -> bool {
        matches!(
            self,
            FilterField::CreatedAt | FilterField::UpdatedAt | FilterField::Priority
        )
    }

    /// Whether `op` may be used with this field.
    pub fn allows(&self, op: CompareOp) -> bool {
        self.is_ordered() || matches!(op, CompareOp::Eq | CompareOp::Ne)
    }

    /// Whether `value` has this field's type.
    pub fn accepts(&self, value: &FilterValue) -> bool {
        matches!(
            (self, value),
            (FilterField::Status, FilterValue::Status(_))
                | (FilterField::Phase, FilterValue::Phase(_))
                | (
                    FilterField::Kind | FilterField::CreatedBy,
                    FilterValue::Text(_)
                )
                | (
                    FilterField::CreatedAt | FilterField::UpdatedAt,
                    FilterValue::Time(_)
                )
                | (FilterField::Priority, FilterValue::Int(_))
        )
    }
}

impl fmt::Display for FilterField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CompareOp {
    pub const ALL: &'static [CompareOp] = &[
        CompareOp::Eq,
        CompareOp::Ne,
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
    ];

    /// The operator as written in a filter (and understood by SQL).
    pub fn as_str(&self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }

    /// Whether `left op right` holds, given how `left` compares to `right`.
    pub fn holds(&self, ordering: Ordering) -> bool {
        match self {
            CompareOp::Eq => ordering.is_eq(),
            CompareOp::Ne => ordering.is_ne(),
            CompareOp::Lt => ordering.is_lt(),
            CompareOp::Le => ordering.is_le(),
            CompareOp::Gt => ordering.is_gt(),
            CompareOp::Ge => ordering.is_ge(),
        }
    }
}

impl fmt::Display for CompareOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A comparison's right-hand side, typed by its field when parsed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterValue {
    Status(Status),
    Phase(Phase),
    /// `kind` and `created_by`.
    Text(String),
    /// `created_at` and `updated_at`, in whole microseconds.
    Time(DateTime<Utc>),
    /// `priority`.
    Int(i32),
}

impl fmt::Display for FilterValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterValue::Status(s) => f.write_str(s.as_str()),
            FilterValue::Phase(p) => f.write_str(p.as_str()),
            FilterValue::Text(s) => write_quoted(f, s),
            FilterValue::Time(t) => {
                write!(f, "\"{}\"", t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            }
            FilterValue::Int(i) => write!(f, "{i}"),
        }
    }
}

fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

impl fmt::Display for FilterExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // OR binds tighter than AND, so only a nested AND needs parentheses (to
            // keep the nesting: parse does not flatten parentheses away).
            FilterExpr::And(items) => {
                write_joined(f, items, " AND ", |e| matches!(e, FilterExpr::And(_)))
            }
            FilterExpr::Or(items) => write_joined(f, items, " OR ", |e| {
                matches!(e, FilterExpr::And(_) | FilterExpr::Or(_))
            }),
            FilterExpr::Not(inner) => match inner.as_ref() {
                FilterExpr::Compare { .. } => write!(f, "NOT {inner}"),
                _ => write!(f, "NOT ({inner})"),
            },
            FilterExpr::Compare { field, op, value } => write!(f, "{field} {op} {value}"),
        }
    }
}

fn write_joined(
    f: &mut fmt::Formatter<'_>,
    items: &[FilterExpr],
    separator: &str,
    needs_parens: impl Fn(&FilterExpr) -> bool,
) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(separator)?;
        }
        if needs_parens(item) {
            write!(f, "({item})")?;
        } else {
            write!(f, "{item}")?;
        }
    }
    Ok(())
}

impl FilterExpr {
    /// Whether `task` matches, with the same meaning as the SQL the store compiles the
    /// expression to.
    pub fn matches(&self, task: &Task) -> bool {
        match self {
            FilterExpr::And(items) => items.iter().all(|e| e.matches(task)),
            FilterExpr::Or(items) => items.iter().any(|e| e.matches(task)),
            FilterExpr::Not(inner) => !inner.matches(task),
            FilterExpr::Compare { field, op, value } => compare(*field, *op, value, task),
        }
    }

    /// The expression's value for any task with this status and phase, when those two
    /// decide it; `None` when it also depends on fields they do not fix. Three-valued
    /// (Kleene) logic, so `Some` is exact: every task with this status and phase
    /// [`matches`](Self::matches) exactly when the answer is `Some(true)`. A listing
    /// uses it to leave out the statuses no matching task can have.
    pub fn decided_by(&self, status: Status, phase: Phase) -> Option<bool> {
        match self {
            FilterExpr::And(items) => kleene(items, false, status, phase),
            FilterExpr::Or(items) => kleene(items, true, status, phase),
            FilterExpr::Not(inner) => inner.decided_by(status, phase).map(|b| !b),
            FilterExpr::Compare { field, op, value } => {
                if !field.allows(*op) || !field.accepts(value) {
                    return Some(false);
                }
                match (field, value) {
                    (FilterField::Status, FilterValue::Status(s)) => {
                        Some(op.holds(eq_ordering(status == *s)))
                    }
                    (FilterField::Phase, FilterValue::Phase(p)) => {
                        Some(op.holds(eq_ordering(phase == *p)))
                    }
                    _ => None,
                }
            }
        }
    }

    /// Whether any comparison in the expression names `field`.
    pub fn mentions(&self, field: FilterField) -> bool {
        match self {
            FilterExpr::And(items) | FilterExpr::Or(items) => {
                items.iter().any(|e| e.mentions(field))
            }
            FilterExpr::Not(inner) => inner.mentions(field),
            FilterExpr::Compare { field: f, .. } => *f == field,
        }
    }
}

fn compare(field: FilterField, op: CompareOp, value: &FilterValue, task: &Task) -> bool {
    if !field.allows(op) {
        return false;
    }
    let ordering = match (field, value) {
        (FilterField::Status, FilterValue::Status(s)) => eq_ordering(task.status == *s),
        (FilterField::Phase, FilterValue::Phase(p)) => eq_ordering(task.phase == *p),
        (FilterField::Kind, FilterValue::Text(s)) => eq_ordering(task.kind == *s),
        (FilterField::CreatedBy, FilterValue::Text(s)) => eq_ordering(task.created_by == *s),
        (FilterField::CreatedAt, FilterValue::Time(t)) => task.created_at.cmp(t),
        (FilterField::UpdatedAt, FilterValue::Time(t)) => task.updated_at.cmp(t),
        (FilterField::Priority, FilterValue::Int(i)) => task.priority.cmp(i),
        _ => return false,
    };
    op.holds(ordering)
}

/// A junction in three-valued logic: `dominant` (false for AND, true for OR) as soon as
/// one operand is decided so; the other value when every operand is decided; else
/// unknown.
fn kleene(items: &[FilterExpr], dominant: bool, status: Status, phase: Phase) -> Option<bool> {
    let mut all_decided = true;
    for item in items {
        match item.decided_by(status, phase) {
            Some(value) if value == dominant => return Some(dominant),
            Some(_) => {}
            None => all_decided = false,
        }
    }
    all_decided.then_some(!dominant)
}

/// For fields compared only with `=` and `!=`: any non-equal ordering will do.
fn eq_ordering(equal: bool) -> Ordering {
    if equal {
        Ordering::Equal
    } else {
        Ordering::Less
    }
}

/// Parses a filter string; `Ok(None)` when it is empty or blank.
///
/// # Errors
/// [`Error::InvalidArgument`] on `filter`, naming the byte offset of the problem and
/// what was expected there (see the module docs).
pub fn parse(input: &str) -> Result<Option<FilterExpr>, Error> {
    if input.len() > MAX_BYTES {
        return Err(error_at(
            MAX_BYTES,
            format!(
                "the filter is {} bytes long; at most {MAX_BYTES} are allowed",
                input.len()
            ),
        ));
    }
    if input.trim().is_empty() {
        return Ok(None);
    }
    let mut parser = Parser {
        src: input,
        pos: 0,
        peeked: None,
        depth: 0,
        comparisons: 0,
    };
    let expr = parser.expression()?;
    let (at, token) = parser.next()?;
    match token {
        Token::Eof => Ok(Some(expr)),
        Token::RParen => Err(error_at(at, "unmatched \")\"")),
        other => Err(error_at(
            at,
            format!(
                "expected AND, OR, a comparison or the end of the filter, found {}",
                other.describe()
            ),
        )),
    }
}

fn error_at(at: usize, reason: impl fmt::Display) -> Error {
    Error::invalid("filter", format!("at {at}: {reason}"))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    LParen,
    RParen,
    Minus,
    Op(CompareOp),
    /// A bare word (also the keywords AND, OR, NOT and integers).
    Word(String),
    /// A quoted string, unescaped.
    Str(String),
    Eof,
}

impl Token {
    fn keyword(&self) -> Option<&'static str> {
        match self {
            Token::Word(w) => ["AND", "OR", "NOT"].into_iter().find(|k| *k == w.as_str()),
            _ => None,
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        self.keyword() == Some(keyword)
    }

    fn describe(&self) -> String {
        match self {
            Token::LParen => "\"(\"".into(),
            Token::RParen => "\")\"".into(),
            Token::Minus => "\"-\"".into(),
            Token::Op(op) => format!("\"{op}\""),
            Token::Word(w) => match self.keyword() {
                Some(k) => k.into(),
                None => format!("{w:?}"),
            },
            Token::Str(s) => format!("the string {s:?}"),
            Token::Eof => "the end of the filter".into(),
        }
    }
}

fn is_word_start(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '@')
}

const FIELD_LIST: &str = "status, phase, kind, created_by, created_at, updated_at, priority";

/// Recursive descent over a lazily lexed token stream, so that the first problem in
/// reading order is the one reported.
struct Parser<'a> {
    src: &'a str,
    /// Byte offset of the next character the lexer reads (always a char boundary).
    pos: usize,
    peeked: Option<(usize, Token)>,
    depth: usize,
    comparisons: usize,
}

impl Parser<'_> {
    fn peek(&mut self) -> Result<&(usize, Token), Error> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex()?);
        }
        match &self.peeked {
            Some(peeked) => Ok(peeked),
            None => Err(Error::Internal("filter lexer lost its token".into())),
        }
    }

    fn next(&mut self) -> Result<(usize, Token), Error> {
        match self.peeked.take() {
            Some(peeked) => Ok(peeked),
            None => self.lex(),
        }
    }

    fn current_char(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.current_char()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn lex(&mut self) -> Result<(usize, Token), Error> {
        while self.current_char().is_some_and(char::is_whitespace) {
            self.bump();
        }
        let start = self.pos;
        let Some(c) = self.bump() else {
            return Ok((start, Token::Eof));
        };
        let token = match c {
            '(' => Token::LParen,
            ')' => Token::RParen,
            '=' => Token::Op(CompareOp::Eq),
            '<' | '>' | '!' => {
                let with_eq = self.current_char() == Some('=');
                if with_eq {
                    self.bump();
                }
                match (c, with_eq) {
                    ('<', false) => Token::Op(CompareOp::Lt),
                    ('<', true) => Token::Op(CompareOp::Le),
                    ('>', false) => Token::Op(CompareOp::Gt),
                    ('>', true) => Token::Op(CompareOp::Ge),
                    (_, true) => Token::Op(CompareOp::Ne),
                    (_, false) => {
                        return Err(error_at(
                            start,
                            "unexpected \"!\"; write \"!=\" to compare, or NOT or \"-\" to negate",
                        ));
                    }
                }
            }
            '"' | '\'' => Token::Str(self.string(start, c)?),
            '-' if self.current_char().is_some_and(|d| d.is_ascii_digit()) => self.word(start),
            '-' => Token::Minus,
            ':' => {
                return Err(error_at(
                    start,
                    "the \":\" (has) operator is not supported; use =, !=, <, <=, > or >=",
                ));
            }
            c if is_word_start(c) => self.word(start),
            c => return Err(error_at(start, format!("unexpected character {c:?}"))),
        };
        Ok((start, token))
    }

    /// The rest of a word whose first character (at `start`) was just read.
    fn word(&mut self, start: usize) -> Token {
        while self.current_char().is_some_and(is_word_char) {
            self.bump();
        }
        Token::Word(self.src[start..self.pos].to_owned())
    }

    /// The rest of a string whose opening `quote` (at `start`) was just read.
    fn string(&mut self, start: usize, quote: char) -> Result<String, Error> {
        let mut out = String::new();
        loop {
            let at = self.pos;
            match self.bump() {
                None => {
                    return Err(error_at(
                        start,
                        format!("unterminated string: no closing {quote} before the end"),
                    ));
                }
                Some(c) if c == quote => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('\\') => out.push('\\'),
                    Some('"') => out.push('"'),
                    Some('\'') => out.push('\''),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some(other) => {
                        return Err(error_at(
                            at,
                            format!(
                                "unknown escape \"\\{other}\"; the escapes are \\\\, \\\", \\', \\n, \\r and \\t"
                            ),
                        ));
                    }
                    None => {
                        return Err(error_at(
                            start,
                            format!("unterminated string: no closing {quote} before the end"),
                        ));
                    }
                },
                Some('\0') => {
                    return Err(error_at(at, "strings must not contain the NUL character"));
                }
                Some(c) => out.push(c),
            }
        }
    }

    /// `expression = sequence { "AND" sequence }`, `sequence = factor { factor }`: one
    /// flat AND of every factor. Stops before `)` or the end.
    fn expression(&mut self) -> Result<FilterExpr, Error> {
        let mut items = vec![self.factor()?];
        loop {
            let (at, token) = self.peek()?.clone();
            match token {
                Token::Eof | Token::RParen => break,
                t if t.is_keyword("AND") => {
                    self.next()?;
                    items.push(self.factor()?);
                }
                Token::Word(_) | Token::Minus | Token::LParen => items.push(self.factor()?),
                other => {
                    let end = if self.depth > 0 {
                        "\")\""
                    } else {
                        "the end of the filter"
                    };
                    return Err(error_at(
                        at,
                        format!(
                            "expected AND, OR, a comparison or {end}, found {}",
                            other.describe()
                        ),
                    ));
                }
            }
        }
        Ok(one_or(items, FilterExpr::And))
    }

    /// `factor = term { "OR" term }`.
    fn factor(&mut self) -> Result<FilterExpr, Error> {
        let mut terms = vec![self.term()?];
        while self.peek()?.1.is_keyword("OR") {
            self.next()?;
            terms.push(self.term()?);
        }
        Ok(one_or(terms, FilterExpr::Or))
    }

    /// `term = [ "NOT" | "-" ] simple`.
    fn term(&mut self) -> Result<FilterExpr, Error> {
        let (at, token) = self.peek()?.clone();
        if token.is_keyword("NOT") {
            self.next()?;
            return Ok(FilterExpr::Not(Box::new(self.simple(Some("NOT"))?)));
        }
        if token == Token::Minus {
            self.next()?;
            if self.current_char().is_none_or(char::is_whitespace) {
                return Err(error_at(
                    at,
                    "\"-\" must be followed directly by what it negates",
                ));
            }
            return Ok(FilterExpr::Not(Box::new(self.simple(Some("\"-\""))?)));
        }
        self.simple(None)
    }

    /// `simple = comparison | "(" expression ")"`.
    fn simple(&mut self, after: Option<&str>) -> Result<FilterExpr, Error> {
        let (at, token) = self.next()?;
        match token {
            Token::LParen => {
                if self.depth >= MAX_DEPTH {
                    return Err(error_at(
                        at,
                        format!("parentheses nest more than {MAX_DEPTH} deep"),
                    ));
                }
                self.depth += 1;
                let inner = self.expression()?;
                let (close_at, close) = self.next()?;
                if close != Token::RParen {
                    return Err(error_at(
                        close_at,
                        format!(
                            "expected \")\" to close the \"(\" at {at}, found {}",
                            close.describe()
                        ),
                    ));
                }
                self.depth -= 1;
                Ok(inner)
            }
            Token::Word(name) if token_is_plain_word(&name) => self.comparison(at, &name),
            other => {
                let after = after.map(|a| format!(" after {a}")).unwrap_or_default();
                Err(error_at(
                    at,
                    format!(
                        "expected a comparison (field operator value) or \"(\"{after}, found {}",
                        other.describe()
                    ),
                ))
            }
        }
    }

    /// `comparison = field operator value`, the field name (at `at`) already read.
    fn comparison(&mut self, at: usize, name: &str) -> Result<FilterExpr, Error> {
        let Some(field) = FilterField::from_name(name) else {
            return Err(error_at(
                at,
                format!("unknown field {name:?}; filterable fields are {FIELD_LIST}"),
            ));
        };
        self.comparisons += 1;
        if self.comparisons > MAX_COMPARISONS {
            return Err(error_at(
                at,
                format!("more than {MAX_COMPARISONS} comparisons"),
            ));
        }
        let (op_at, token) = self.next()?;
        let Token::Op(op) = token else {
            return Err(error_at(
                op_at,
                format!(
                    "expected an operator (=, !=, <, <=, >, >=) after {field}, found {}",
                    token.describe()
                ),
            ));
        };
        if !field.allows(op) {
            return Err(error_at(
                op_at,
                format!("operator \"{op}\" is not allowed for {field}; use = or !="),
            ));
        }
        let (value_at, token) = self.next()?;
        let value = typed_value(field, op, value_at, token)?;
        Ok(FilterExpr::Compare { field, op, value })
    }
}

fn token_is_plain_word(word: &str) -> bool {
    !matches!(word, "AND" | "OR" | "NOT")
}

fn one_or(mut items: Vec<FilterExpr>, many: fn(Vec<FilterExpr>) -> FilterExpr) -> FilterExpr {
    if items.len() == 1
        && let Some(only) = items.pop()
    {
        return only;
    }
    many(items)
}

/// Reads a value token as the field's type.
fn typed_value(
    field: FilterField,
    op: CompareOp,
    at: usize,
    token: Token,
) -> Result<FilterValue, Error> {
    let (text, quoted) = match token {
        Token::Word(w) if token_is_plain_word(&w) => (w, false),
        Token::Str(s) => (s, true),
        Token::Word(keyword) => {
            return Err(error_at(
                at,
                format!(
                    "expected a value for {field} after \"{op}\", found {keyword}; quote it to use it as text"
                ),
            ));
        }
        other => {
            return Err(error_at(
                at,
                format!(
                    "expected a value for {field} after \"{op}\", found {}",
                    other.describe()
                ),
            ));
        }
    };
    match field {
        FilterField::Status => text.parse().map(FilterValue::Status).map_err(|_| {
            error_at(
                at,
                format!("{text:?} is not a status; expected one of {}", names(Status::ALL)),
            )
        }),
        FilterField::Phase => text.parse().map(FilterValue::Phase).map_err(|_| {
            error_at(
                at,
                format!("{text:?} is not a phase; expected one of {}", names(Phase::ALL)),
            )
        }),
        FilterField::Kind | FilterField::CreatedBy => Ok(FilterValue::Text(text)),
        FilterField::CreatedAt | FilterField::UpdatedAt => {
            timestamp(&text).map(FilterValue::Time).ok_or_else(|| {
                error_at(
                    at,
                    format!(
                        "expected an RFC 3339 timestamp for {field}, such as \"2024-05-01T12:00:00Z\" (in quotes), found {text:?}"
                    ),
                )
            })
        }
        FilterField::Priority => {
            if quoted {
                return Err(error_at(
                    at,
                    format!(
                        "expected an integer for {field}, found the string {text:?}; write integers without quotes"
                    ),
                ));
            }
            text.parse().map(FilterValue::Int).map_err(|_| {
                let digits = text.strip_prefix('-').unwrap_or(&text);
                if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
                    error_at(
                        at,
                        format!(
                            "{text} is out of range for {field} ({}..={})",
                            i32::MIN,
                            i32::MAX
                        ),
                    )
                } else {
                    error_at(at, format!("expected an integer for {field}, found {text:?}"))
                }
            })
        }
    }
}

fn names<T: fmt::Display>(values: &[T]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An RFC 3339 timestamp in UTC, truncated to the microsecond; a leap second becomes
/// the start of the next second (as Postgres reads it).
fn timestamp(text: &str) -> Option<DateTime<Utc>> {
    let mut t = DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc);
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        t = t
            .with_nanosecond(nanos - 1_000_000_000)?
            .checked_add_signed(TimeDelta::seconds(1))?;
    }
    Some(t.trunc_subsecs(6))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::TaskId;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn p(input: &str) -> FilterExpr {
        match parse(input) {
            Ok(Some(e)) => e,
            other => panic!("{input:?} should parse, got {other:?}"),
        }
    }

    fn err(input: &str) -> String {
        match parse(input) {
            Err(Error::InvalidArgument { field, reason }) => {
                assert_eq!(field, "filter");
                reason
            }
            other => panic!("{input:?} should fail, got {other:?}"),
        }
    }

    fn cmp(field: FilterField, op: CompareOp, value: FilterValue) -> FilterExpr {
        FilterExpr::Compare { field, op, value }
    }

    fn status(s: Status) -> FilterExpr {
        cmp(FilterField::Status, CompareOp::Eq, FilterValue::Status(s))
    }

    fn kind(k: &str) -> FilterExpr {
        cmp(
            FilterField::Kind,
            CompareOp::Eq,
            FilterValue::Text(k.into()),
        )
    }

    fn prio(op: CompareOp, i: i32) -> FilterExpr {
        cmp(FilterField::Priority, op, FilterValue::Int(i))
    }

    fn not(e: FilterExpr) -> FilterExpr {
        FilterExpr::Not(Box::new(e))
    }

    use FilterExpr::{And, Or};

    #[test]
    fn empty_and_blank_are_no_filter() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("  \t\n ").unwrap(), None);
    }

    #[test]
    fn every_field_parses_to_its_type() {
        assert_eq!(p("status = active"), status(Status::Active));
        assert_eq!(
            p("phase != 'review'"),
            cmp(
                FilterField::Phase,
                CompareOp::Ne,
                FilterValue::Phase(Phase::Review)
            )
        );
        assert_eq!(p("kind = manual"), kind("manual"));
        assert_eq!(
            p("created_by = \"alice@example.com\""),
            cmp(
                FilterField::CreatedBy,
                CompareOp::Eq,
                FilterValue::Text("alice@example.com".into())
            )
        );
        assert_eq!(
            p("created_by = alice@example.com"),
            p("created_by = \"alice@example.com\"")
        );
        assert_eq!(
            p("created_at >= \"2024-05-01T12:00:00+02:00\""),
            cmp(
                FilterField::CreatedAt,
                CompareOp::Ge,
                FilterValue::Time(Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).unwrap())
            )
        );
        assert_eq!(
            p("updated_at < '2024-05-01T00:00:00.123456789Z'"),
            cmp(
                FilterField::UpdatedAt,
                CompareOp::Lt,
                FilterValue::Time(
                    Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).unwrap()
                        + TimeDelta::microseconds(123_456)
                )
            )
        );
        assert_eq!(p("priority > -5"), prio(CompareOp::Gt, -5));
        assert_eq!(p("priority<=2147483647"), prio(CompareOp::Le, i32::MAX));
        assert_eq!(p("priority = -2147483648"), prio(CompareOp::Eq, i32::MIN));
    }

    #[test]
    fn whitespace_is_optional_around_operators() {
        assert_eq!(p("status=active"), p("status = active"));
        assert_eq!(p("priority>=-1"), prio(CompareOp::Ge, -1));
        assert_eq!(
            p("(status=active)OR(kind=x)"),
            Or(vec![status(Status::Active), kind("x")])
        );
    }

    #[test]
    fn leap_seconds_become_the_next_second() {
        assert_eq!(
            p("created_at = \"2016-12-31T23:59:60.5Z\""),
            cmp(
                FilterField::CreatedAt,
                CompareOp::Eq,
                FilterValue::Time(
                    Utc.with_ymd_and_hms(2017, 1, 1, 0, 0, 0).unwrap()
                        + TimeDelta::milliseconds(500)
                )
            )
        );
    }

    #[test]
    fn or_binds_tighter_than_and() {
        let (a, b, c) = (status(Status::Active), kind("b"), kind("c"));
        assert_eq!(
            p("status = active AND kind = b OR kind = c"),
            And(vec![a.clone(), Or(vec![b.clone(), c.clone()])])
        );
        assert_eq!(
            p("status = active OR kind = b AND kind = c"),
            And(vec![Or(vec![a.clone(), b.clone()]), c.clone()])
        );
        assert_eq!(
            p("status = active kind = b OR kind = c"),
            And(vec![a.clone(), Or(vec![b.clone(), c.clone()])])
        );
        assert_eq!(
            p("(status = active AND kind = b) OR kind = c"),
            Or(vec![And(vec![a.clone(), b.clone()]), c.clone()])
        );
        assert_eq!(
            p("status = active OR kind = b OR kind = c"),
            Or(vec![a, b, c])
        );
    }

    #[test]
    fn juxtaposition_is_and_and_flattens_with_and() {
        let (a, b, c) = (status(Status::Active), kind("b"), kind("c"));
        assert_eq!(
            p("status = active kind = b"),
            And(vec![a.clone(), b.clone()])
        );
        assert_eq!(
            p("status = active kind = b AND kind = c"),
            And(vec![a.clone(), b.clone(), c.clone()])
        );
        // Parentheses keep their nesting.
        assert_eq!(
            p("(status = active kind = b) kind = c"),
            And(vec![And(vec![a.clone(), b.clone()]), c.clone()])
        );
        // Redundant parentheses around one comparison vanish.
        assert_eq!(p("((status = active))"), a);
    }

    #[test]
    fn negation() {
        let (a, b) = (status(Status::Active), kind("b"));
        assert_eq!(p("NOT status = active"), not(a.clone()));
        assert_eq!(p("-status = active"), not(a.clone()));
        assert_eq!(p("-(status = active)"), not(a.clone()));
        assert_eq!(
            p("NOT (status = active OR kind = b)"),
            not(Or(vec![a.clone(), b.clone()]))
        );
        // NOT binds tighter than OR.
        assert_eq!(
            p("NOT status = active OR kind = b"),
            Or(vec![not(a.clone()), b.clone()])
        );
        assert_eq!(p("NOT(NOT status = active)"), not(not(a.clone())));
        assert_eq!(p("kind = b -status = active"), And(vec![b, not(a)]));
        // A negative number is a value, not a negation.
        assert_eq!(p("priority = -3"), prio(CompareOp::Eq, -3));
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(p(r#"kind = "a\"b""#), kind("a\"b"));
        assert_eq!(p(r"kind = 'it\'s'"), kind("it's"));
        assert_eq!(p(r#"kind = 'say "hi"'"#), kind("say \"hi\""));
        assert_eq!(p(r#"kind = "back\\slash""#), kind("back\\slash"));
        assert_eq!(p(r#"kind = "t\tn\nr\r""#), kind("t\tn\nr\r"));
        assert_eq!(p(r#"kind = "AND""#), kind("AND"));
        assert_eq!(p(r#"kind = "x) OR (y""#), kind("x) OR (y"));
        assert_eq!(p("kind = \"ünï cødé\""), kind("ünï cødé"));
        assert_eq!(p("kind = a.b-c_d"), kind("a.b-c_d"));
        assert_eq!(p("kind = 123"), kind("123"));
        assert_eq!(p("kind = \"\""), kind(""));
    }

    #[test]
    fn canonical_form() {
        let cases = [
            ("status=active", "status = active"),
            (
                "-status='active' kind=x",
                "NOT status = active AND kind = \"x\"",
            ),
            (
                "created_at > '2024-05-01T12:00:00.5+02:00'",
                "created_at > \"2024-05-01T10:00:00.500Z\"",
            ),
            (
                "(kind = a AND kind = b) OR NOT (priority > 1 kind = c)",
                "(kind = \"a\" AND kind = \"b\") OR NOT (priority > 1 AND kind = \"c\")",
            ),
            (
                "kind = a OR (kind = b OR kind = c)",
                "kind = \"a\" OR (kind = \"b\" OR kind = \"c\")",
            ),
            ("-(-kind = a)", "NOT (NOT kind = \"a\")"),
            (r#"created_by = 'q"\\'"#, r#"created_by = "q\"\\""#),
        ];
        for (input, canonical) in cases {
            let e = p(input);
            assert_eq!(e.to_string(), canonical, "canonical form of {input:?}");
            assert_eq!(p(canonical), e, "{canonical:?} reads back");
        }
    }

    #[test]
    fn error_messages_name_the_position_and_what_was_expected() {
        let cases: &[(&str, &str)] = &[
            (
                "status = active colour = red",
                "at 16: unknown field \"colour\"; filterable fields are status, phase, kind, created_by, created_at, updated_at, priority",
            ),
            (
                "status < active",
                "at 7: operator \"<\" is not allowed for status; use = or !=",
            ),
            (
                "kind >= x",
                "at 5: operator \">=\" is not allowed for kind; use = or !=",
            ),
            (
                "status = \"bogus\"",
                "at 9: \"bogus\" is not a status; expected one of inactive, active, completed, cancelled, failed",
            ),
            (
                "phase = done",
                "at 8: \"done\" is not a phase; expected one of spec_clarification, planning, development, review, completed, cancelled, failed",
            ),
            (
                "priority = \"x\"",
                "at 11: expected an integer for priority, found the string \"x\"; write integers without quotes",
            ),
            (
                "priority = x",
                "at 11: expected an integer for priority, found \"x\"",
            ),
            (
                "priority = 2147483648",
                "at 11: 2147483648 is out of range for priority (-2147483648..=2147483647)",
            ),
            (
                "created_at = \"not a time\"",
                "at 13: expected an RFC 3339 timestamp for created_at, such as \"2024-05-01T12:00:00Z\" (in quotes), found \"not a time\"",
            ),
            (
                "updated_at > 2024-05-01",
                "at 13: expected an RFC 3339 timestamp for updated_at, such as \"2024-05-01T12:00:00Z\" (in quotes), found \"2024-05-01\"",
            ),
            (
                "status active",
                "at 7: expected an operator (=, !=, <, <=, >, >=) after status, found \"active\"",
            ),
            (
                "status =",
                "at 8: expected a value for status after \"=\", found the end of the filter",
            ),
            (
                "kind = AND",
                "at 7: expected a value for kind after \"=\", found AND; quote it to use it as text",
            ),
            (
                "kind = (x)",
                "at 7: expected a value for kind after \"=\", found \"(\"",
            ),
            (
                "status:active",
                "at 6: the \":\" (has) operator is not supported; use =, !=, <, <=, > or >=",
            ),
            ("kind = x $", "at 9: unexpected character '$'"),
            (
                "!kind = x",
                "at 0: unexpected \"!\"; write \"!=\" to compare, or NOT or \"-\" to negate",
            ),
            (
                "(kind = x",
                "at 9: expected \")\" to close the \"(\" at 0, found the end of the filter",
            ),
            ("kind = x)", "at 8: unmatched \")\""),
            (
                "()",
                "at 1: expected a comparison (field operator value) or \"(\", found \")\"",
            ),
            (
                "kind = x AND",
                "at 12: expected a comparison (field operator value) or \"(\", found the end of the filter",
            ),
            (
                "kind = x OR OR kind = y",
                "at 12: expected a comparison (field operator value) or \"(\", found OR",
            ),
            (
                "NOT",
                "at 3: expected a comparison (field operator value) or \"(\" after NOT, found the end of the filter",
            ),
            (
                "NOT -kind = x",
                "at 4: expected a comparison (field operator value) or \"(\" after NOT, found \"-\"",
            ),
            (
                "- kind = x",
                "at 0: \"-\" must be followed directly by what it negates",
            ),
            (
                "\"kind\" = x",
                "at 0: expected a comparison (field operator value) or \"(\", found the string \"kind\"",
            ),
            (
                "kind = x = y",
                "at 9: expected AND, OR, a comparison or the end of the filter, found \"=\"",
            ),
            (
                "(kind = x 'y')",
                "at 10: expected AND, OR, a comparison or \")\", found the string \"y\"",
            ),
            (
                "kind = \"abc",
                "at 7: unterminated string: no closing \" before the end",
            ),
            (
                "kind = 'abc\\",
                "at 7: unterminated string: no closing ' before the end",
            ),
            (
                "kind = \"a\\qb\"",
                "at 9: unknown escape \"\\q\"; the escapes are \\\\, \\\", \\', \\n, \\r and \\t",
            ),
            (
                "kind = \"a\0b\"",
                "at 9: strings must not contain the NUL character",
            ),
            (
                "Status = active",
                "at 0: unknown field \"Status\"; filterable fields are status, phase, kind, created_by, created_at, updated_at, priority",
            ),
            (
                "status = ACTIVE",
                "at 9: \"ACTIVE\" is not a status; expected one of inactive, active, completed, cancelled, failed",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(err(input), *expected, "error for {input:?}");
        }
    }

    #[test]
    fn limits() {
        // Length: at most 2048 bytes, counted before anything else.
        let long = format!("kind = \"{}\"", "x".repeat(MAX_BYTES - 9));
        assert_eq!(long.len(), MAX_BYTES);
        assert!(parse(&long).is_ok());
        let too_long = format!("kind = \"{}\"", "x".repeat(MAX_BYTES - 8));
        assert_eq!(
            err(&too_long),
            "at 2048: the filter is 2049 bytes long; at most 2048 are allowed"
        );
        assert!(parse(&" ".repeat(MAX_BYTES + 1)).is_err());

        // Depth: 32 nested parentheses are fine, 33 are not.
        let nested = |n: usize| format!("{}kind = x{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(p(&nested(MAX_DEPTH)), kind("x"));
        assert_eq!(
            err(&nested(MAX_DEPTH + 1)),
            "at 32: parentheses nest more than 32 deep"
        );
        // Sibling parentheses do not add up.
        let siblings = vec!["(kind = x)"; 40].join(" ");
        assert!(parse(&siblings).is_ok());

        // Comparisons: 64 are fine, the 65th is not.
        let many = |n: usize| vec!["priority = 1"; n].join(" OR ");
        assert!(parse(&many(MAX_COMPARISONS)).is_ok());
        let at = (MAX_COMPARISONS) * "priority = 1 OR ".len();
        assert_eq!(
            err(&many(MAX_COMPARISONS + 1)),
            format!("at {at}: more than 64 comparisons")
        );
    }

    fn task() -> Task {
        Task {
            task_id: TaskId::new(),
            title: "t".into(),
            description: String::new(),
            kind: "manual".into(),
            payload: serde_json::Value::Null,
            metadata: serde_json::json!({}),
            priority: 3,
            partition: 0,
            status: Status::Active,
            phase: Phase::Planning,
            last_error: None,
            created_at: Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).unwrap(),
            updated_at: Utc.with_ymd_and_hms(2024, 6, 1, 0, 0, 0).unwrap(),
            created_by: "alice".into(),
            version: 2,
            pod: None,
        }
    }

    #[test]
    fn matches_evaluates_in_memory() {
        let t = task();
        let yes = [
            "status = active",
            "status != inactive",
            "phase = planning",
            "kind = manual",
            "created_by = alice",
            "created_by != bob",
            "created_at = \"2024-05-01T00:00:00Z\"",
            "created_at <= \"2024-05-01T00:00:00Z\"",
            "created_at >= \"2024-05-01T02:00:00+02:00\"",
            "created_at < \"2024-05-01T00:00:00.000001Z\"",
            "updated_at > \"2024-05-31T23:59:59.999999Z\"",
            "priority = 3",
            "priority > 2 priority < 4",
            "priority >= 3 AND priority <= 3",
            "status = inactive OR kind = manual",
            "NOT status = inactive",
            "-(status = inactive OR phase = review)",
            "kind = sleep OR (status = active AND NOT priority < 0)",
        ];
        for f in yes {
            assert!(p(f).matches(&t), "{f:?} should match");
        }
        let no = [
            "status = inactive",
            "phase != planning",
            "kind = Manual",
            "created_by = \"alice \"",
            "created_at > \"2024-05-01T00:00:00Z\"",
            "updated_at < \"2024-06-01T00:00:00Z\"",
            "priority != 3",
            "priority < 3 OR priority > 3",
            "-kind = manual",
            "kind = manual status = inactive",
            "NOT (NOT status = inactive)",
        ];
        for f in no {
            assert!(!p(f).matches(&t), "{f:?} should not match");
        }
    }

    #[test]
    fn ill_typed_comparisons_match_nothing() {
        let t = task();
        let bad = [
            cmp(
                FilterField::Status,
                CompareOp::Lt,
                FilterValue::Status(Status::Active),
            ),
            cmp(
                FilterField::Status,
                CompareOp::Eq,
                FilterValue::Text("active".into()),
            ),
            cmp(
                FilterField::Priority,
                CompareOp::Eq,
                FilterValue::Text("3".into()),
            ),
        ];
        for e in bad {
            assert!(!e.matches(&t), "{e:?}");
            assert!(not(e).matches(&t));
        }
        assert!(And(vec![]).matches(&t));
        assert!(!Or(vec![]).matches(&t));
    }

    #[test]
    fn status_and_phase_decide_only_what_they_fix() {
        let decided = |f: &str| p(f).decided_by(Status::Active, Phase::Review);
        assert_eq!(decided("phase = review"), Some(true));
        assert_eq!(decided("phase = completed"), Some(false));
        assert_eq!(decided("status != active OR kind = x"), None);
        assert_eq!(decided("status = completed kind = x"), Some(false));
        assert_eq!(decided("NOT (status = active OR kind = x)"), Some(false));
        assert_eq!(decided("kind = x OR NOT phase = planning"), Some(true));
        assert_eq!(decided("priority > 1"), None);
        assert_eq!(
            And(vec![]).decided_by(Status::Active, Phase::Review),
            Some(true)
        );
        assert_eq!(
            Or(vec![]).decided_by(Status::Active, Phase::Review),
            Some(false)
        );
    }

    #[test]
    fn serde_round_trip() {
        let e = p("NOT (status = active OR created_at > '2024-05-01T00:00:00Z') priority >= 1");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<FilterExpr>(&json).unwrap(), e);
    }

    fn value_for(field: FilterField) -> BoxedStrategy<FilterValue> {
        match field {
            FilterField::Status => prop::sample::select(Status::ALL)
                .prop_map(FilterValue::Status)
                .boxed(),
            FilterField::Phase => prop::sample::select(Phase::ALL)
                .prop_map(FilterValue::Phase)
                .boxed(),
            FilterField::Kind | FilterField::CreatedBy => {
                "[^\\x00]{0,12}".prop_map(FilterValue::Text).boxed()
            }
            FilterField::CreatedAt | FilterField::UpdatedAt => {
                // Years 0000..=9999, in whole microseconds.
                (-62_167_219_200_000_000i64..253_402_300_799_999_999i64)
                    .prop_filter_map("in range", DateTime::from_timestamp_micros)
                    .prop_map(FilterValue::Time)
                    .boxed()
            }
            FilterField::Priority => any::<i32>().prop_map(FilterValue::Int).boxed(),
        }
    }

    fn comparison() -> impl Strategy<Value = FilterExpr> {
        prop::sample::select(FilterField::ALL).prop_flat_map(|field| {
            let ops: Vec<CompareOp> = CompareOp::ALL
                .iter()
                .copied()
                .filter(|op| field.allows(*op))
                .collect();
            (prop::sample::select(ops), value_for(field))
                .prop_map(move |(op, value)| FilterExpr::Compare { field, op, value })
        })
    }

    fn expr() -> impl Strategy<Value = FilterExpr> {
        comparison().prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..5).prop_map(FilterExpr::And),
                prop::collection::vec(inner.clone(), 2..5).prop_map(FilterExpr::Or),
                inner.prop_map(|e| FilterExpr::Not(Box::new(e))),
            ]
        })
    }

    /// Fragments that make up plausible and implausible filters.
    fn fragments() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            prop::sample::select(vec![
                "status",
                "phase",
                "kind",
                "created_by",
                "created_at",
                "updated_at",
                "priority",
                "colour",
                "AND",
                "OR",
                "NOT",
                "-",
                "(",
                ")",
                "=",
                "!=",
                "<",
                "<=",
                ">",
                ">=",
                ":",
                "!",
                "active",
                "review",
                "manual",
                "-5",
                "42",
                "99999999999",
                "\"2024-05-01T00:00:00Z\"",
                "'x'",
                "\"a\\\"b\"",
                "\"",
                "'",
                "\\",
                "é",
                " ",
                "  ",
                "\t",
            ])
            .prop_map(str::to_owned),
            "\\PC{0,3}",
        ];
        prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.join(" "))
    }

    fn check_never_panics(input: &str) -> Result<(), TestCaseError> {
        match parse(input) {
            Ok(None) => prop_assert!(input.trim().is_empty()),
            Ok(Some(e)) => {
                // Whatever parses has a canonical form that parses back to it.
                let canonical = e.to_string();
                if canonical.len() <= MAX_BYTES {
                    prop_assert_eq!(parse(&canonical).ok().flatten(), Some(e));
                }
            }
            Err(Error::InvalidArgument { field, reason }) => {
                prop_assert_eq!(field, "filter");
                prop_assert!(reason.starts_with("at "), "{}", reason);
            }
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn display_parses_back_to_the_same_expression(e in expr()) {
            let text = e.to_string();
            prop_assume!(text.len() <= MAX_BYTES);
            prop_assert_eq!(parse(&text).unwrap(), Some(e), "canonical text {}", text);
        }

        #[test]
        fn decided_by_status_and_phase_is_what_matches_says(
            e in expr(),
            status in prop::sample::select(Status::ALL),
            phase in prop::sample::select(Phase::ALL),
            kind in prop::sample::select(vec!["manual", "sleep", ""]),
            priority in -3i32..3,
        ) {
            let mut t = task();
            t.status = status;
            t.phase = phase;
            t.kind = kind.to_owned();
            t.priority = priority;
            if let Some(decided) = e.decided_by(status, phase) {
                prop_assert_eq!(decided, e.matches(&t), "{}", e);
            }
        }

        #[test]
        fn never_panics_on_arbitrary_strings(input in any::<String>()) {
            check_never_panics(&input)?;
        }

        #[test]
        fn never_panics_on_token_soup(input in fragments()) {
            check_never_panics(&input)?;
        }
    }
}
