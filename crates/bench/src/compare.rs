//! `taskpod bench compare A.json B.json [--fail-below R]`: two reports of one scenario
//! side by side, for a change's before (A, the baseline) and after (B).
//!
//! Every latency statistic and every figure is shown with its B/A ratio and whether B
//! is better or worse, which depends on what the number is, read from its key's unit
//! suffix (the report puts the unit in every key, see [`crate::report`]):
//! - higher is better: rates, `_per_s` (a latency's `rate_per_s`, `completed_per_s`);
//! - lower is better: times and sizes, `_ms`, `_s`, `_bytes`, `_kib`, and CPU,
//!   `_core_percent`;
//! - counts without a unit (`tasks_created`, `pods`) say what a run did, not how well:
//!   shown, not judged; except the counts of things that should not happen
//!   ([`PROBLEMS`]: `errors` ...), flagged when they rise from 0.
//!
//! A latency's `count` and `elapsed_s` are the run's size, and its `min_ms` and
//! `max_ms` single samples: shown, not judged. With `--fail-below R` the command fails
//! (exit code 14, [`BENCH_REGRESSED`](taskpod_client::error::exit::BENCH_REGRESSED))
//! when B is worse than A by more than R allows for any judged number: a
//! higher-is-better one below R x A, a lower-is-better one above A / R, or a problem
//! count above 0 where A had 0. A number missing on one side is shown and not judged;
//! reports of two scenarios are refused.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use taskpod_client::config::GlobalArgs;
use taskpod_client::error::CliError;

use super::BenchError;

/// Counts of things that should not happen: flagged when they rise from 0.
pub const PROBLEMS: [&str; 5] = [
    "errors",
    "not_running",
    "missing",
    "unmatched",
    "trails_incomplete",
];

/// A latency's statistics that are shown but never judged: the run's size and single
/// samples.
const UNJUDGED_STATS: [&str; 4] = ["count", "elapsed_s", "min_ms", "max_ms"];

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Reads two reports of `taskpod bench <scenario> --json` (or -o json) \
    of the same scenario and prints every latency statistic and figure of both with B/A. \
    Rates (_per_s) are better higher; times and sizes (_ms, _s, _bytes, _kib, \
    _core_percent) better lower; plain counts are shown, not judged, but errors (and \
    missing, unmatched, not_running, trails_incomplete) rising from 0 are flagged. A \
    latency's count, elapsed_s, min_ms and max_ms are not judged. Exit codes: 0 \
    compared (and nothing regressed), 2 unreadable reports or different scenarios, 14 \
    with --fail-below when B regressed. See BENCHMARKS.md."
)]
pub struct CompareArgs {
    /// The baseline report (A)
    #[arg(value_name = "A.json")]
    pub baseline: PathBuf,
    /// The report compared with it (B)
    #[arg(value_name = "B.json")]
    pub candidate: PathBuf,
    /// Fail (exit 14) when B is worse than A by more than R allows: a rate below R x A,
    /// a time or size above A / R, errors rising from 0 (R in (0, 1], e.g. 0.9)
    #[arg(long, value_name = "R", value_parser = parse_factor)]
    pub fail_below: Option<f64>,
    /// Print the comparison as one JSON object (as does -o json)
    #[arg(long)]
    pub json: bool,
}

fn parse_factor(text: &str) -> Result<f64, String> {
    let factor: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if factor > 0.0 && factor <= 1.0 {
        Ok(factor)
    } else {
        Err(format!(
            "{factor} is outside (0, 1]: the share of A that B may fall to"
        ))
    }
}

/// `(key, value)` pairs in the order the report wrote them (serde_json's maps sort).
#[derive(Debug, Clone, Default, PartialEq)]
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Pairs<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Ordered(pairs))
            }
        }
        deserializer.deserialize_map(Pairs(std::marker::PhantomData))
    }
}

/// A report as `--json` prints it (see [`crate::report::Report`]).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ReportFile {
    pub scenario: String,
    #[serde(default)]
    parameters: Ordered<Value>,
    #[serde(default)]
    cluster: Value,
    #[serde(default)]
    latencies: Ordered<Ordered<Value>>,
    #[serde(default)]
    figures: Ordered<Value>,
}

impl ReportFile {
    /// Parses a report.
    ///
    /// # Errors
    /// A message for people when the text is not a report.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// Every number, latencies first: `(measure, value, what it is)`. Strings (a
    /// latency's `what`) are left out.
    fn numbers(&self) -> Vec<(String, f64, Direction)> {
        let mut out = Vec::new();
        for (name, stats) in &self.latencies.0 {
            for (stat, value) in &stats.0 {
                if let Some(v) = value.as_f64() {
                    let direction = if UNJUDGED_STATS.contains(&stat.as_str()) {
                        Direction::NotJudged
                    } else {
                        direction(stat)
                    };
                    out.push((format!("{name}.{stat}"), v, direction));
                }
            }
        }
        for (key, value) in &self.figures.0 {
            if let Some(v) = value.as_f64() {
                out.push((key.clone(), v, direction(key)));
            }
        }
        out
    }

    fn parameters_text(&self) -> String {
        let pairs: Vec<String> = self
            .parameters
            .0
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        pairs.join(", ")
    }

    fn cluster_text(&self) -> String {
        let field = |k: &str| self.cluster.get(k).and_then(Value::as_str).unwrap_or("?");
        format!("{} at {}", field("mode"), field("address"))
    }
}

/// What a number is, from its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Rates: B worse when lower.
    HigherIsBetter,
    /// Times, sizes, CPU: B worse when higher.
    LowerIsBetter,
    /// Something that should stay 0: B worse when it rises from 0.
    Problem,
    /// What a run did, not how well.
    NotJudged,
}

/// The direction of a figure or statistic, by its key's unit suffix (`_per_s` before
/// `_s`).
pub fn direction(key: &str) -> Direction {
    if key.ends_with("_per_s") {
        Direction::HigherIsBetter
    } else if ["_ms", "_s", "_bytes", "_kib", "_core_percent"]
        .iter()
        .any(|suffix| key.ends_with(suffix))
    {
        Direction::LowerIsBetter
    } else if PROBLEMS.contains(&key) || key.ends_with("_errors") {
        Direction::Problem
    } else {
        Direction::NotJudged
    }
}

/// How B compares with A on one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A count that says what a run did.
    NotJudged,
    OnlyInA,
    OnlyInB,
    /// A is 0 for a rate, time or size: no ratio to judge by.
    NoBaseline,
    Same,
    Better,
    /// Worse, within what `--fail-below` allows (or without it).
    Worse,
    /// Worse by more than `--fail-below` allows.
    Regressed,
    /// A problem count that was 0 in A.
    RoseFromZero,
}

impl Verdict {
    /// Whether it fails `--fail-below`.
    pub fn fails(self) -> bool {
        matches!(self, Verdict::Regressed | Verdict::RoseFromZero)
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::NotJudged => "",
            Verdict::OnlyInA => "only in A",
            Verdict::OnlyInB => "only in B",
            Verdict::NoBaseline => "A is 0",
            Verdict::Same => "same",
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::Regressed => "REGRESSED",
            Verdict::RoseFromZero => "ROSE FROM 0",
        }
    }
}

/// Judges one number: B against A, in `direction`, failing below `fail_below` (when
/// given) of A.
pub fn judge(
    direction: Direction,
    a: Option<f64>,
    b: Option<f64>,
    fail_below: Option<f64>,
) -> Verdict {
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        (Some(_), None) => return Verdict::OnlyInA,
        (None, _) => return Verdict::OnlyInB,
    };
    let worse = match direction {
        Direction::NotJudged => return Verdict::NotJudged,
        Direction::Problem => {
            return if a == 0.0 && b > 0.0 {
                Verdict::RoseFromZero
            } else if b == a {
                Verdict::Same
            } else if b < a {
                Verdict::Better
            } else {
                Verdict::Worse
            };
        }
        Direction::HigherIsBetter => b < a,
        Direction::LowerIsBetter => b > a,
    };
    if b == a {
        return Verdict::Same;
    }
    if a == 0.0 {
        return Verdict::NoBaseline;
    }
    if !worse {
        return Verdict::Better;
    }
    let beyond = fail_below.is_some_and(|r| match direction {
        Direction::HigherIsBetter => b < r * a,
        _ => b > a / r,
    });
    if beyond {
        Verdict::Regressed
    } else {
        Verdict::Worse
    }
}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `latency.stat` or a figure's key.
    pub measure: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// B/A, when both are there and A is not 0.
    pub ratio: Option<f64>,
    pub direction: Direction,
    pub verdict: Verdict,
}

/// Two reports side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub scenario: String,
    pub fail_below: Option<f64>,
    /// Parameters whose values differ: (key, A's, B's), `null` where one lacks it.
    pub parameters_differ: Vec<(String, Value, Value)>,
    pub rows: Vec<Row>,
}

impl Comparison {
    /// The rows that fail `--fail-below`.
    pub fn failures(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.verdict.fails())
    }
}

/// Compares `b` with the baseline `a`.
///
/// # Errors
/// Reports of different scenarios (a usage error).
pub fn compare(
    a: &ReportFile,
    b: &ReportFile,
    fail_below: Option<f64>,
) -> Result<Comparison, String> {
    if a.scenario != b.scenario {
        return Err(format!(
            "the reports are of different scenarios ({} and {}): nothing to compare",
            a.scenario, b.scenario
        ));
    }
    let (a_numbers, b_numbers) = (a.numbers(), b.numbers());
    let mut rows: Vec<Row> = a_numbers
        .iter()
        .map(|(measure, va, direction)| {
            let vb = b_numbers
                .iter()
                .find(|(m, _, _)| m == measure)
                .map(|(_, v, _)| *v);
            row(measure, Some(*va), vb, *direction, fail_below)
        })
        .collect();
    rows.extend(
        b_numbers
            .iter()
            .filter(|(m, _, _)| !a_numbers.iter().any(|(ma, _, _)| ma == m))
            .map(|(measure, vb, direction)| row(measure, None, Some(*vb), *direction, fail_below)),
    );
    let mut parameters_differ = Vec::new();
    let keys = a.parameters.0.iter().chain(&b.parameters.0).map(|(k, _)| k);
    for key in keys {
        let value = |r: &ReportFile| {
            r.parameters
                .0
                .iter()
                .find(|(k, _)| k == key)
                .map_or(Value::Null, |(_, v)| v.clone())
        };
        let (va, vb) = (value(a), value(b));
        if va != vb && !parameters_differ.iter().any(|(k, _, _)| k == key) {
            parameters_differ.push((key.clone(), va, vb));
        }
    }
    Ok(Comparison {
        scenario: a.scenario.clone(),
        fail_below,
        parameters_differ,
        rows,
    })
}

fn row(
    measure: &str,
    a: Option<f64>,
    b: Option<f64>,
    direction: Direction,
    fail_below: Option<f64>,
) -> Row {
    let ratio = match (a, b) {
        (Some(a), Some(b)) if a != 0.0 => Some(b / a),
        _ => None,
    };
    Row {
        measure: measure.to_owned(),
        a,
        b,
        ratio,
        direction,
        verdict: judge(direction, a, b, fail_below),
    }
}

/// A number as the report wrote it: at most three decimals.
fn number(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 9e15 => format!("{}", v as i64),
        Some(v) => format!("{:.3}", v).trim_end_matches('0').to_owned(),
    }
}

/// The comparison for people: what was compared, then one aligned row per number.
pub fn to_text(
    comparison: &Comparison,
    a: (&Path, &ReportFile),
    b: (&Path, &ReportFile),
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "compare: {}", comparison.scenario);
    for (side, (path, report)) in [("A", a), ("B", b)] {
        let _ = writeln!(
            out,
            "{side}: {} ({}; {})",
            path.display(),
            report.parameters_text(),
            report.cluster_text()
        );
    }
    for (key, va, vb) in &comparison.parameters_differ {
        let _ = writeln!(out, "note: the parameters differ: {key} A={va} B={vb}");
    }
    out.push('\n');
    const HEADERS: [&str; 5] = ["MEASURE", "A", "B", "B/A", "VERDICT"];
    let rows: Vec<[String; 5]> = comparison
        .rows
        .iter()
        .map(|r| {
            [
                r.measure.clone(),
                number(r.a),
                number(r.b),
                r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.3}")),
                r.verdict.text().to_owned(),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(HEADERS.map(str::to_owned)).chain(rows) {
        let mut line = format!("{:<w$}", row[0], w = widths[0]);
        for (cell, w) in row.iter().zip(widths).skip(1).take(3) {
            let _ = write!(line, "  {cell:>w$}");
        }
        let _ = write!(line, "  {}", row[4]);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let judged = comparison
        .rows
        .iter()
        .filter(|r| r.direction != Direction::NotJudged)
        .count();
    let failures: Vec<&str> = comparison.failures().map(|r| r.measure.as_str()).collect();
    out.push('\n');
    match comparison.fail_below {
        Some(r) if failures.is_empty() => {
            let _ = writeln!(
                out,
                "ok: none of {judged} judged numbers is worse than --fail-below {r} allows"
            );
        }
        Some(r) => {
            let _ = writeln!(
                out,
                "regressed: {} of {judged} judged numbers are worse than --fail-below {r} \
                 allows: {}",
                failures.len(),
                failures.join(", ")
            );
        }
        None => {
            let worse = comparison
                .rows
                .iter()
                .filter(|r| matches!(r.verdict, Verdict::Worse | Verdict::RoseFromZero))
                .count();
            let _ = writeln!(
                out,
                "{worse} of {judged} judged numbers are worse in B (--fail-below R makes that \
                 an exit code)"
            );
        }
    }
    out
}

fn read(path: &Path) -> Result<ReportFile, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        BenchError::Cli(CliError::ReadInput {
            path: path.display().to_string(),
            source,
        })
    })?;
    ReportFile::parse(&text).map_err(|e| {
        BenchError::Usage(format!(
            "{} is not a report of `taskpod bench <scenario> --json`: {e}",
            path.display()
        ))
    })
}

/// Reads both reports, prints the comparison, and fails when `--fail-below` says so.
///
/// # Errors
/// Unreadable files or different scenarios (usage errors); with `--fail-below`,
/// [`CliError::BenchRegressed`] (exit code 14) after printing.
pub fn run(args: &CompareArgs, global: &GlobalArgs) -> Result<(), BenchError> {
    let a = read(&args.baseline)?;
    let b = read(&args.candidate)?;
    let comparison = compare(&a, &b, args.fail_below).map_err(BenchError::Usage)?;
    let text = if args.json || global.output.is_json() {
        serde_json::to_string(&comparison)
            .map_err(|e| BenchError::Failed(format!("serialise the comparison: {e}")))?
            + "\n"
    } else {
        to_text(&comparison, (&args.baseline, &a), (&args.candidate, &b))
    };
    taskpod_client::output::emit(&text)?;
    let regressed = comparison.failures().count();
    match args.fail_below {
        Some(factor) if regressed > 0 => Err(BenchError::Cli(CliError::BenchRegressed {
            regressed,
            factor,
        })),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_suffix_gives_the_direction() {
        for key in ["completed_per_s", "rate_per_s", "seed_tasks_per_s"] {
            assert_eq!(direction(key), Direction::HigherIsBetter, "{key}");
        }
        for key in [
            "p99_ms",
            "drain_ms",
            "startup_s",
            "rss_per_pod_bytes",
            "heap_kib",
            "idle_cpu_worker_core_percent",
        ] {
            assert_eq!(direction(key), Direction::LowerIsBetter, "{key}");
        }
        for key in ["errors", "create_errors", "missing", "not_running"] {
            assert_eq!(direction(key), Direction::Problem, "{key}");
        }
        for key in [
            "tasks_created",
            "pods",
            "achieved_rate",
            "advisory_locks_all",
        ] {
            assert_eq!(direction(key), Direction::NotJudged, "{key}");
        }
    }

    #[test]
    fn a_rate_fails_below_r_times_a_and_a_latency_above_a_over_r() {
        let rate = |b| judge(Direction::HigherIsBetter, Some(100.0), Some(b), Some(0.9));
        assert_eq!(rate(120.0), Verdict::Better);
        assert_eq!(rate(100.0), Verdict::Same);
        assert_eq!(rate(91.0), Verdict::Worse);
        assert_eq!(rate(90.0), Verdict::Worse, "exactly R x A still passes");
        assert_eq!(rate(89.9), Verdict::Regressed);
        let latency = |b| judge(Direction::LowerIsBetter, Some(9.0), Some(b), Some(0.9));
        assert_eq!(latency(5.0), Verdict::Better);
        assert_eq!(latency(9.9), Verdict::Worse);
        assert_eq!(latency(10.0), Verdict::Worse, "exactly A / R still passes");
        assert_eq!(latency(10.1), Verdict::Regressed);
        // Without --fail-below nothing regresses, it is only worse.
        assert_eq!(
            judge(Direction::HigherIsBetter, Some(100.0), Some(1.0), None),
            Verdict::Worse
        );
        assert!(!Verdict::Worse.fails() && Verdict::Regressed.fails());
    }

    #[test]
    fn counts_are_not_judged_but_errors_rising_from_zero_are() {
        assert_eq!(
            judge(Direction::NotJudged, Some(1000.0), Some(1.0), Some(0.9)),
            Verdict::NotJudged
        );
        let errors = |a, b| judge(Direction::Problem, Some(a), Some(b), Some(0.9));
        assert_eq!(errors(0.0, 3.0), Verdict::RoseFromZero);
        assert!(errors(0.0, 3.0).fails());
        assert_eq!(errors(2.0, 3.0), Verdict::Worse);
        assert_eq!(errors(3.0, 0.0), Verdict::Better);
        assert_eq!(errors(0.0, 0.0), Verdict::Same);
    }

    #[test]
    fn a_number_missing_on_one_side_or_a_zero_baseline_is_not_judged() {
        let j = |a, b| judge(Direction::LowerIsBetter, a, b, Some(0.9));
        assert_eq!(j(Some(1.0), None), Verdict::OnlyInA);
        assert_eq!(j(None, Some(1.0)), Verdict::OnlyInB);
        assert_eq!(j(Some(0.0), Some(5.0)), Verdict::NoBaseline);
        assert!(
            ![Verdict::OnlyInA, Verdict::OnlyInB, Verdict::NoBaseline]
                .iter()
                .any(|v| v.fails())
        );
    }

    fn report(scenario: &str, figures: &str, p50: f64) -> ReportFile {
        ReportFile::parse(&format!(
            r#"{{"scenario":"{scenario}","parameters":{{"tasks":10,"concurrency":4}},
                "cluster":{{"mode":"dev","address":"http://127.0.0.1:1"}},
                "latencies":{{"call":{{"what":"one call","count":100,"elapsed_s":2.0,
                    "rate_per_s":50.0,"min_ms":1.0,"mean_ms":3.0,"p50_ms":{p50},
                    "p90_ms":4.0,"p99_ms":5.0,"p999_ms":6.0,"max_ms":60.0}}}},
                "figures":{{{figures}}},"notes":[]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn reports_compare_row_by_row_in_the_reports_order() {
        let a = report(
            "start",
            r#""errors":0,"tasks_per_s":100.0,"only_a_ms":1"#,
            2.0,
        );
        let b = report("start", r#""errors":2,"tasks_per_s":95.0,"only_b":7"#, 3.0);
        let c = compare(&a, &b, Some(0.9)).unwrap();
        let measures: Vec<&str> = c.rows.iter().map(|r| r.measure.as_str()).collect();
        assert_eq!(
            measures,
            [
                "call.count",
                "call.elapsed_s",
                "call.rate_per_s",
                "call.min_ms",
                "call.mean_ms",
                "call.p50_ms",
                "call.p90_ms",
                "call.p99_ms",
                "call.p999_ms",
                "call.max_ms",
                "errors",
                "tasks_per_s",
                "only_a_ms",
                "only_b",
            ]
        );
        let verdict = |m: &str| c.rows.iter().find(|r| r.measure == m).unwrap().verdict;
        assert_eq!(verdict("call.p50_ms"), Verdict::Regressed, "3 > 2 / 0.9");
        assert_eq!(verdict("call.max_ms"), Verdict::NotJudged);
        assert_eq!(verdict("call.elapsed_s"), Verdict::NotJudged);
        assert_eq!(verdict("errors"), Verdict::RoseFromZero);
        assert_eq!(verdict("tasks_per_s"), Verdict::Worse);
        assert_eq!(verdict("only_a_ms"), Verdict::OnlyInA);
        assert_eq!(verdict("only_b"), Verdict::OnlyInB);
        let failures: Vec<&str> = c.failures().map(|r| r.measure.as_str()).collect();
        assert_eq!(failures, ["call.p50_ms", "errors"]);
        let ratio = c
            .rows
            .iter()
            .find(|r| r.measure == "call.p50_ms")
            .unwrap()
            .ratio;
        assert_eq!(ratio, Some(1.5));
        assert!(c.parameters_differ.is_empty());

        let text = to_text(&c, (Path::new("a.json"), &a), (Path::new("b.json"), &b));
        assert!(
            text.starts_with(
                "compare: start\nA: a.json (tasks=10, concurrency=4; dev at http://127.0.0.1:1)\n"
            ),
            "{text}"
        );
        let line = text.lines().find(|l| l.starts_with("call.p50_ms")).unwrap();
        assert!(
            line.contains("1.500") && line.ends_with("REGRESSED"),
            "{line}"
        );
        assert!(text.contains("regressed: 2 of"), "{text}");
    }

    #[test]
    fn different_scenarios_and_malformed_reports_are_refused() {
        let a = report("start", "", 2.0);
        let b = report("create", "", 2.0);
        let err = compare(&a, &b, None).unwrap_err();
        assert!(err.contains("different scenarios"), "{err}");
        assert!(ReportFile::parse("{}").is_err(), "no scenario");
        assert!(ReportFile::parse("[1]").is_err());
    }

    #[test]
    fn differing_parameters_are_noted() {
        let a = report("start", "", 2.0);
        let mut b = report("start", "", 2.0);
        b.parameters.0[0].1 = Value::from(20);
        b.parameters.0.push(("batch".into(), Value::from(5)));
        let c = compare(&a, &b, None).unwrap();
        assert_eq!(
            c.parameters_differ,
            [
                ("tasks".into(), Value::from(10), Value::from(20)),
                ("batch".into(), Value::Null, Value::from(5)),
            ]
        );
    }

    #[test]
    fn the_factor_is_a_share_of_a() {
        assert_eq!(parse_factor("0.9"), Ok(0.9));
        assert_eq!(parse_factor("1"), Ok(1.0));
        assert!(parse_factor("0").is_err());
        assert!(parse_factor("1.1").is_err());
        assert!(parse_factor("x").is_err());
    }
}
