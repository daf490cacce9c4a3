//! What the standard OpenTelemetry environment asks for, read once at start-up.
//!
//! taskpod takes the `OTEL_*` variables every OpenTelemetry SDK reads, so a collector,
//! a Helm chart or a compose file configures it like any other service. The exporter
//! itself still reads the variables that only tune it (headers, timeout, compression,
//! sampler, batch and export intervals); this module decides the few things that change
//! what the process does: whether anything is exported at all, where to, under which
//! service name, and how logs look.

use std::fmt;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One compact line per event (the default).
    Text,
    /// Multi-line, for a person reading a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The telemetry a process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `service.name` on every span and metric.
    pub service_name: String,
    pub log_format: LogFormat,
    /// The OTLP/gRPC endpoint spans go to; `None` exports no spans (and creates none
    /// beyond what logging needs).
    pub traces_endpoint: Option<String>,
    /// The OTLP/gRPC endpoint metrics go to; `None` keeps them for `/metrics` only.
    pub metrics_endpoint: Option<String>,
}

/// A variable asks for something this build cannot do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}={value:?}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Pretty => "pretty",
            Self::Json => "json",
        })
    }
}

impl TelemetryConfig {
    /// Reads the process environment.
    ///
    /// # Errors
    /// A variable this build cannot honour (an exporter or protocol it lacks, an
    /// unknown log format): better refused at start than silently exporting nothing.
    pub fn from_env(default_service: &str) -> Result<Self, ConfigError> {
        Self::from_vars(default_service, |name| std::env::var(name).ok())
    }

    /// [`TelemetryConfig::from_env`] over any source of variables, so the rules are
    /// testable without touching the process environment.
    ///
    /// # Errors
    /// As [`TelemetryConfig::from_env`].
    pub fn from_vars(
        default_service: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        // Empty means unset, as the specification says.
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let log_format = match get("TASKPOD_LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    variable: "TASKPOD_LOG_FORMAT",
                    value: other.to_owned(),
                    reason: "expected text, pretty or json",
                });
            }
        };
        let service_name = get("OTEL_SERVICE_NAME")
            .or_else(|| {
                get("OTEL_RESOURCE_ATTRIBUTES").and_then(|attrs| {
                    attrs.split(',').find_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        (k.trim() == "service.name").then(|| v.trim().to_owned())
                    })
                })
            })
            .unwrap_or_else(|| default_service.to_owned());
        let disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if let Some(protocol) = get("OTEL_EXPORTER_OTLP_PROTOCOL")
            && !protocol.eq_ignore_ascii_case("grpc")
        {
            return Err(ConfigError {
                variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
                value: protocol,
                reason: "taskpod exports OTLP over gRPC only (port 4317 on a collector)",
            });
        }
        let general = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let traces_endpoint = signal_endpoint(
            &get,
            "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            general.as_deref(),
        )?;
        let metrics_endpoint = signal_endpoint(
            &get,
            "OTEL_METRICS_EXPORTER",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            general.as_deref(),
        )?;
        Ok(Self {
            service_name,
            log_format,
            traces_endpoint: traces_endpoint.filter(|_| !disabled),
            metrics_endpoint: metrics_endpoint.filter(|_| !disabled),
        })
    }
}

/// One signal's endpoint: its exporter must be `otlp` (the default) and an endpoint
/// must be set, its own or the general one.
fn signal_endpoint(
    get: &impl Fn(&str) -> Option<String>,
    exporter_var: &'static str,
    endpoint_var: &'static str,
    general: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    match get(exporter_var).as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(ConfigError {
                variable: exporter_var,
                value: other.to_owned(),
                reason: "expected otlp or none",
            });
        }
    }
    Ok(get(endpoint_var).or_else(|| general.map(str::to_owned)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<TelemetryConfig, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TelemetryConfig::from_vars("taskpod-api", |k| vars.get(k).cloned())
    }

    #[test]
    fn nothing_set_exports_nothing() {
        let c = config(&[]).unwrap();
        assert_eq!(c.traces_endpoint, None);
        assert_eq!(c.metrics_endpoint, None);
        assert_eq!(c.service_name, "taskpod-api");
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn the_general_endpoint_serves_both_signals_unless_one_is_set_or_off() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]).unwrap();
        assert_eq!(c.traces_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(c.metrics_endpoint.as_deref(), Some("http://collector:4317"));
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4317"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ])
        .unwrap();
        assert_eq!(c.traces_endpoint.as_deref(), Some("http://tempo:4317"));
        assert_eq!(c.metrics_endpoint, None);
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .unwrap();
        assert_eq!((c.traces_endpoint, c.metrics_endpoint), (None, None));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("OTEL_TRACES_EXPORTER", " "),
            ("OTEL_SERVICE_NAME", ""),
        ])
        .unwrap();
        assert_eq!(c.traces_endpoint, None);
        assert_eq!(c.service_name, "taskpod-api");
    }

    #[test]
    fn the_service_name_comes_from_the_standard_variables_first() {
        let c = config(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=ci, service.name=edge-api",
        )])
        .unwrap();
        assert_eq!(c.service_name, "edge-api");
        let c = config(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=edge-api"),
            ("OTEL_SERVICE_NAME", "api-eu"),
        ])
        .unwrap();
        assert_eq!(c.service_name, "api-eu");
    }

    #[test]
    fn what_this_build_cannot_do_is_refused_by_name() {
        for (var, value) in [
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_METRICS_EXPORTER", "prometheus"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("TASKPOD_LOG_FORMAT", "xml"),
        ] {
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var);
            assert!(err.to_string().contains(value), "{err}");
        }
        assert!(config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).is_ok());
    }
}
