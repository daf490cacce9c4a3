//! What a scenario measured, and how it is shown: a table for people, one JSON object
//! for machines (`--json`).
//!
//! Every scenario fills the same [`Report`]: its parameters, the cluster it ran on, one
//! or more latency [`Summary`]s taken from HDR histograms (count, rate, p50, p90, p99,
//! p99.9, max), and named [`Figure`]s for what is not a latency (bytes, lock counts,
//! one-off times). The JSON keys carry their unit (`p99_ms`, `rss_after_bytes`) and keep
//! the order the scenario added them in, so two runs diff line by line.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde::ser::{SerializeMap as _, Serializer};

/// Recorded values are microseconds, from 1 µs to one hour, at three significant
/// digits (a 0.1 % error at any magnitude).
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 3_600_000_000;
const SIGFIGS: u8 = 3;

/// A latency histogram in microseconds. Values outside the range are clamped, never
/// dropped, so `count` is always the number of samples.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        // The bounds are constants that the crate accepts (low >= 1, high >= 2 * low,
        // sigfig <= 5): creation cannot fail.
        #[allow(clippy::expect_used)]
        let histogram = Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIGS)
            .expect("constant histogram bounds are valid");
        Self(histogram)
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.clamp(LOWEST_US, HIGHEST_US));
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The value at `quantile` (0.0-1.0), in microseconds; 0 when empty.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(quantile)
        }
    }

    /// Adds another histogram's samples (per-task histograms merged at the end).
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides: addition cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// The summary of what was recorded, with the rate over `elapsed`.
    pub fn summary(&self, name: &'static str, what: &'static str, elapsed: Duration) -> Summary {
        let h = &self.0;
        let empty = h.is_empty();
        let at = |q: f64| if empty { 0 } else { h.value_at_quantile(q) };
        Summary {
            name,
            what,
            count: h.len(),
            elapsed,
            min_us: if empty { 0 } else { h.min() },
            mean_us: if empty { 0.0 } else { h.mean() },
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: if empty { 0 } else { h.max() },
        }
    }
}

/// One latency distribution, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The JSON key (`start_to_running`).
    pub name: &'static str,
    /// What one sample is, for people (`StartPod call until the pod runs`).
    pub what: &'static str,
    pub count: u64,
    /// The measured stretch the rate is taken over.
    pub elapsed: Duration,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Summary {
    /// Samples per second over the measured stretch; 0 when nothing was timed.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.count as f64 / secs
        } else {
            0.0
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Rounds to three decimals, so JSON shows `12.345`, not `12.345000000000001`.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Serialize for Summary {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(11))?;
        map.serialize_entry("what", self.what)?;
        map.serialize_entry("count", &self.count)?;
        map.serialize_entry("elapsed_s", &round3(self.elapsed.as_secs_f64()))?;
        map.serialize_entry("rate_per_s", &round3(self.rate()))?;
        map.serialize_entry("min_ms", &ms(self.min_us))?;
        map.serialize_entry("mean_ms", &round3(self.mean_us / 1000.0))?;
        map.serialize_entry("p50_ms", &ms(self.p50_us))?;
        map.serialize_entry("p90_ms", &ms(self.p90_us))?;
        map.serialize_entry("p99_ms", &ms(self.p99_us))?;
        map.serialize_entry("p999_ms", &ms(self.p999_us))?;
        map.serialize_entry("max_ms", &ms(self.max_us))?;
        map.end()
    }
}

/// A latency for people: `850 µs`, `3.42 ms`, `45.6 ms`, `2414 ms`, `12.00 s`.
pub fn format_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..10_000 => format!("{:.2} ms", ms(us)),
        10_000..100_000 => format!("{:.1} ms", ms(us)),
        100_000..10_000_000 => format!("{:.0} ms", ms(us)),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// A byte count for people: `512 B`, `3.4 KiB`, `41.2 MiB`, `1.50 GiB`.
pub fn format_bytes(bytes: f64) -> String {
    const KIB: f64 = 1024.0;
    if bytes < KIB {
        format!("{bytes:.0} B")
    } else if bytes < KIB * KIB {
        format!("{:.1} KiB", bytes / KIB)
    } else if bytes < KIB * KIB * KIB {
        format!("{:.1} MiB", bytes / KIB / KIB)
    } else {
        format!("{:.2} GiB", bytes / KIB / KIB / KIB)
    }
}

/// The unit of a [`Figure`], which decides its JSON key suffix and how people see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A plain number (locks, pods, partitions).
    Count,
    Bytes,
    Millis,
    /// Percent of one core.
    CorePercent,
    /// Items per second (tasks/s, transactions/s).
    PerSecond,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Count => "",
            Unit::Bytes => "_bytes",
            Unit::Millis => "_ms",
            Unit::CorePercent => "_core_percent",
            Unit::PerSecond => "_per_s",
        }
    }
}

/// One number that is not a latency distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// The JSON key without its unit suffix (`rss_after`, `advisory_locks_at_n`).
    pub key: String,
    /// For people (`worker RSS with 10000 pods`).
    pub label: String,
    pub value: f64,
    pub unit: Unit,
}

impl Figure {
    pub fn new(key: impl Into<String>, label: impl Into<String>, value: f64, unit: Unit) -> Self {
        Self {
            key: key.into(),
            label: label.into(),
            value,
            unit,
        }
    }

    pub fn count(key: impl Into<String>, label: impl Into<String>, value: u64) -> Self {
        Self::new(key, label, value as f64, Unit::Count)
    }

    /// `count` items over `elapsed`, per second (0 over no time).
    pub fn rate(
        key: impl Into<String>,
        label: impl Into<String>,
        count: u64,
        elapsed: Duration,
    ) -> Self {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 { count as f64 / secs } else { 0.0 };
        Self::new(key, label, rate, Unit::PerSecond)
    }

    pub fn millis(key: impl Into<String>, label: impl Into<String>, value: Duration) -> Self {
        Self::new(key, label, value.as_secs_f64() * 1000.0, Unit::Millis)
    }

    pub fn json_key(&self) -> String {
        format!("{}{}", self.key, self.unit.suffix())
    }

    fn json_value(&self) -> serde_json::Value {
        match self.unit {
            // Whole numbers stay integers in JSON.
            Unit::Count | Unit::Bytes if self.value.fract() == 0.0 && self.value.abs() < 9e15 => {
                serde_json::Value::from(self.value as i64)
            }
            _ => serde_json::Value::from(round3(self.value)),
        }
    }

    fn display_value(&self) -> String {
        match self.unit {
            Unit::Count if self.value.fract() == 0.0 => format!("{}", self.value as i64),
            Unit::Count => format!("{:.2}", self.value),
            Unit::Bytes => format!("{} ({:.0} B)", format_bytes(self.value), self.value),
            Unit::Millis => format_us((self.value * 1000.0).round().max(0.0) as u64),
            Unit::CorePercent => format!("{:.2} % of a core", self.value),
            Unit::PerSecond => format!("{:.1}/s", self.value),
        }
    }
}

/// Where a scenario ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterInfo {
    /// `dev` (started by the bench) or `remote` (`--address`).
    pub mode: &'static str,
    pub address: String,
    /// Known for a dev cluster only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
}

/// Everything one scenario run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub scenario: &'static str,
    /// The scenario's settings, as `(key, value)` in the order shown.
    pub parameters: Vec<(&'static str, serde_json::Value)>,
    pub cluster: ClusterInfo,
    pub latencies: Vec<Summary>,
    pub figures: Vec<Figure>,
    /// Remarks for people (e.g. "3 calls returned before the pod ran"); also in JSON.
    pub notes: Vec<String>,
}

/// Serialises `(key, value)` pairs as a JSON object in their given order.
struct OrderedMap<'a, K, V>(&'a [(K, V)]);

impl<K: AsRef<str>, V: Serialize> Serialize for OrderedMap<'_, K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k.as_ref(), v)?;
        }
        map.end()
    }
}

impl Serialize for Report {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let latencies: Vec<(&str, &Summary)> = self.latencies.iter().map(|s| (s.name, s)).collect();
        let figures: Vec<(String, serde_json::Value)> = self
            .figures
            .iter()
            .map(|f| (f.json_key(), f.json_value()))
            .collect();
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("scenario", self.scenario)?;
        map.serialize_entry("parameters", &OrderedMap(&self.parameters))?;
        map.serialize_entry("cluster", &self.cluster)?;
        map.serialize_entry("latencies", &OrderedMap(&latencies))?;
        map.serialize_entry("figures", &OrderedMap(&figures))?;
        map.serialize_entry("notes", &self.notes)?;
        map.end()
    }
}

impl Report {
    /// One compact JSON object on one line.
    pub fn to_json(&self) -> String {
        // A Report holds only strings, numbers and maps with string keys.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The report for people: a header, the latency table, then the figures.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let params: Vec<String> = self
            .parameters
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        let _ = writeln!(out, "scenario: {} ({})", self.scenario, params.join(", "));
        let c = &self.cluster;
        let mut cluster = format!("cluster: {} at {}", c.mode, c.address);
        if let (Some(w), Some(r)) = (c.workers, c.replicas) {
            let _ = write!(cluster, ", {w} worker(s), {r} API replica(s)");
        }
        if let Some(pg) = &c.postgres {
            let _ = write!(cluster, ", {pg}");
        }
        let _ = writeln!(out, "{cluster}");
        if !self.latencies.is_empty() {
            out.push('\n');
            out.push_str(&latency_table(&self.latencies));
            for s in &self.latencies {
                let _ = writeln!(out, "  {}: {}", s.name, s.what);
            }
        }
        if !self.figures.is_empty() {
            out.push('\n');
            let width = self
                .figures
                .iter()
                .map(|f| f.label.chars().count())
                .max()
                .unwrap_or(0);
            for f in &self.figures {
                let _ = writeln!(out, "{:<width$}  {}", f.label, f.display_value());
            }
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "note: {note}");
            }
        }
        out
    }
}

/// The aligned latency table: one row per summary.
pub fn latency_table(summaries: &[Summary]) -> String {
    const HEADERS: [&str; 10] = [
        "MEASURE", "COUNT", "RATE/S", "MIN", "P50", "P90", "P99", "P99.9", "MAX", "MEAN",
    ];
    let rows: Vec<[String; 10]> = summaries
        .iter()
        .map(|s| {
            [
                s.name.to_owned(),
                s.count.to_string(),
                format!("{:.1}", s.rate()),
                format_us(s.min_us),
                format_us(s.p50_us),
                format_us(s.p90_us),
                format_us(s.p99_us),
                format_us(s.p999_us),
                format_us(s.max_us),
                format_us(s.mean_us.round() as u64),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 0 {
                let _ = write!(line, "{cell:<w$}");
            } else {
                let _ = write!(line, "  {cell:>w$}");
            }
        }
        line.push('\n');
        line
    };
    let mut out = line(&HEADERS.map(str::to_owned));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latencies(values_us: &[u64]) -> Latencies {
        let mut l = Latencies::new();
        for &us in values_us {
            l.record(Duration::from_micros(us));
        }
        l
    }

    #[test]
    fn quantiles_come_from_the_histogram() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let s = latencies(&values).summary("x", "one", Duration::from_secs(2));
        assert_eq!(s.count, 1000);
        assert_eq!(s.rate(), 500.0);
        // Three significant digits: within 0.1 % of the exact order statistic.
        let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001;
        assert!(near(s.p50_us, 500_000), "{}", s.p50_us);
        assert!(near(s.p90_us, 900_000), "{}", s.p90_us);
        assert!(near(s.p99_us, 990_000), "{}", s.p99_us);
        assert!(near(s.p999_us, 999_000), "{}", s.p999_us);
        assert!(near(s.max_us, 1_000_000), "{}", s.max_us);
        assert!(near(s.min_us, 1_000), "{}", s.min_us);
    }

    #[test]
    fn out_of_range_samples_are_clamped_not_dropped() {
        let mut l = Latencies::new();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(10 * 3600));
        assert_eq!(l.count(), 2);
        assert_eq!(l.quantile_us(0.0), 1);
        assert!(l.quantile_us(1.0) >= HIGHEST_US);
    }

    #[test]
    fn an_empty_histogram_summarises_to_zeros() {
        let s = Latencies::new().summary("x", "one", Duration::ZERO);
        assert_eq!((s.count, s.p50_us, s.max_us, s.rate()), (0, 0, 0, 0.0));
    }

    #[test]
    fn merging_adds_samples() {
        let mut a = latencies(&[1_000, 2_000]);
        a.merge(&latencies(&[3_000]));
        assert_eq!(a.count(), 3);
    }

    #[test]
    fn latencies_are_formatted_with_sensible_precision() {
        assert_eq!(format_us(850), "850 µs");
        assert_eq!(format_us(3_421), "3.42 ms");
        assert_eq!(format_us(45_640), "45.6 ms");
        assert_eq!(format_us(312_400), "312 ms");
        assert_eq!(format_us(2_414_000), "2414 ms");
        assert_eq!(format_us(12_000_000), "12.00 s");
    }

    #[test]
    fn bytes_are_formatted_in_binary_units() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(3.5 * 1024.0), "3.5 KiB");
        assert_eq!(format_bytes(41.25 * 1024.0 * 1024.0), "41.2 MiB");
        assert_eq!(format_bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.50 GiB");
    }

    fn sample_report() -> Report {
        let s = latencies(&[1_000, 2_000, 3_000]).summary(
            "start_to_running",
            "StartPod until the pod runs",
            Duration::from_millis(1500),
        );
        Report {
            scenario: "start",
            parameters: vec![
                ("tasks", serde_json::json!(3)),
                ("concurrency", serde_json::json!(1)),
            ],
            cluster: ClusterInfo {
                mode: "dev",
                address: "http://127.0.0.1:1".into(),
                workers: Some(2),
                replicas: Some(1),
                postgres: Some("PostgreSQL 15.18".into()),
            },
            latencies: vec![s],
            figures: vec![
                Figure::count("errors", "calls that failed", 0),
                Figure::new("rss_after", "worker RSS", 4096.0, Unit::Bytes),
                Figure::millis(
                    "all_running",
                    "all running",
                    Duration::from_micros(1_234_567),
                ),
                Figure::new("idle_cpu_worker", "idle CPU", 0.25, Unit::CorePercent),
                Figure::rate("tasks", "tasks/s", 3000, Duration::from_secs(2)),
            ],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn the_json_report_is_one_object_with_units_in_its_keys() {
        let text = sample_report().to_json();
        assert!(!text.contains('\n'), "one line: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["scenario"], "start");
        assert_eq!(v["parameters"]["tasks"], 3);
        assert_eq!(v["cluster"]["mode"], "dev");
        assert_eq!(v["cluster"]["workers"], 2);
        let lat = &v["latencies"]["start_to_running"];
        assert_eq!(lat["count"], 3);
        assert_eq!(lat["rate_per_s"], 2.0);
        assert_eq!(lat["elapsed_s"], 1.5);
        for key in [
            "min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms",
        ] {
            assert!(lat[key].is_number(), "{key} in {lat}");
        }
        assert_eq!(lat["min_ms"], 1.0);
        assert_eq!(v["figures"]["errors"], 0);
        assert_eq!(v["figures"]["rss_after_bytes"], 4096);
        assert_eq!(v["figures"]["all_running_ms"], 1234.567);
        assert_eq!(v["figures"]["idle_cpu_worker_core_percent"], 0.25);
        assert_eq!(v["figures"]["tasks_per_s"], 1500.0);
        assert_eq!(v["notes"][0], "a note");
    }

    #[test]
    fn json_keys_keep_the_scenarios_order() {
        let text = sample_report().to_json();
        let pos = |needle: &str| text.find(needle).unwrap();
        assert!(pos("\"scenario\"") < pos("\"parameters\""));
        assert!(pos("\"tasks\"") < pos("\"concurrency\""));
        assert!(pos("\"errors\"") < pos("\"rss_after_bytes\""));
        assert!(pos("\"p50_ms\"") < pos("\"p999_ms\""));
    }

    #[test]
    fn a_remote_cluster_leaves_out_what_it_does_not_know() {
        let mut report = sample_report();
        report.cluster = ClusterInfo {
            mode: "remote",
            address: "http://h:1".into(),
            workers: None,
            replicas: None,
            postgres: None,
        };
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let cluster = v["cluster"].as_object().unwrap();
        assert_eq!(cluster.len(), 2, "{cluster:?}");
    }

    #[test]
    fn the_text_report_has_the_table_and_the_figures() {
        let text = sample_report().to_text();
        assert!(
            text.starts_with("scenario: start (tasks=3, concurrency=1)\n"),
            "{text}"
        );
        assert!(text.contains("2 worker(s), 1 API replica(s), PostgreSQL 15.18"));
        let header = text.lines().find(|l| l.starts_with("MEASURE")).unwrap();
        for col in ["COUNT", "RATE/S", "P50", "P90", "P99", "P99.9", "MAX"] {
            assert!(header.contains(col), "{header}");
        }
        let row = text
            .lines()
            .find(|l| l.starts_with("start_to_running "))
            .unwrap();
        assert!(row.contains("  3  "), "{row}");
        assert!(row.contains("2.0"), "{row}");
        assert!(text.contains("worker RSS"));
        assert!(text.contains("4.0 KiB (4096 B)"), "{text}");
        assert!(text.contains("1235 ms"), "{text}");
        assert!(text.contains("0.25 % of a core"), "{text}");
        assert!(text.contains("1500.0/s"), "{text}");
        assert!(text.contains("note: a note"));
    }

    #[test]
    fn table_columns_line_up() {
        let a = latencies(&[1_000]).summary("a", "", Duration::from_secs(1));
        let b = latencies(&[12_345_678]).summary("longer_name", "", Duration::from_secs(1));
        let table = latency_table(&[a, b]);
        let widths: Vec<usize> = table.lines().map(|l| l.chars().count()).collect();
        assert_eq!(widths.len(), 3);
        assert!(widths.iter().all(|w| *w == widths[0]), "{table}");
    }
}
