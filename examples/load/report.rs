//! Latency samples and the output of one run.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Map, Value};

/// Latency samples in microseconds.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u32>);

impl Latencies {
    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Takes every sample of `other`.
    pub fn merge(&mut self, mut other: Latencies) {
        self.0.append(&mut other.0);
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sorts the samples, so that percentiles can be read.
    pub fn sorted(mut self) -> Sorted {
        self.0.sort_unstable();
        Sorted(self.0)
    }
}

/// Latency samples in order.
#[derive(Debug)]
pub struct Sorted(Vec<u32>);

impl Sorted {
    /// The `p`-th percentile in milliseconds (nearest rank), or 0 without
    /// samples.
    pub fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.0.len()) - 1;
        f64::from(self.0[index]) / 1000.0
    }
}

/// The result of one run: what was asked, and what was measured.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    params: Vec<(&'static str, Value)>,
    metrics: Vec<(&'static str, Value)>,
}

impl Report {
    /// An empty report of `scenario`.
    pub fn new(scenario: &'static str) -> Self {
        Report {
            scenario,
            params: Vec::new(),
            metrics: Vec::new(),
        }
    }

    /// Adds an input of the run.
    pub fn param(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        self.params.push((name, value.into()));
        self
    }

    /// Adds a measured figure if there is one.
    pub fn metric_opt(self, name: &'static str, value: Option<f64>) -> Self {
        match value {
            Some(value) => self.metric(name, value),
            None => self,
        }
    }

    /// Adds a measured figure; floats keep three decimals.
    pub fn metric(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        let value = match value.into() {
            Value::Number(n) if n.is_f64() => {
                let x = n.as_f64().unwrap_or(0.0);
                Value::from((x * 1000.0).round() / 1000.0)
            }
            other => other,
        };
        self.metrics.push((name, value));
        self
    }

    /// Adds the first error of the run, if there was one.
    pub fn first_error(self, error: Option<String>) -> Self {
        match error {
            Some(e) => self.metric("first_error", e),
            None => self,
        }
    }

    /// Adds p50, p90, p99 and max of `latencies`, in milliseconds.
    pub fn latencies(self, latencies: Latencies) -> Self {
        let sorted = latencies.sorted();
        self.metric("p50_ms", sorted.ms(50.0))
            .metric("p90_ms", sorted.ms(90.0))
            .metric("p99_ms", sorted.ms(99.0))
            .metric("max_ms", sorted.ms(100.0))
    }

    /// Prints the human line, on standard output or, with `json`, on
    /// standard error with the JSON object on standard output.
    pub fn print(&self, label: &str, json: bool) {
        let mut line = format!("{:<9} {:<14}", self.scenario, label);
        for (name, value) in &self.params {
            let _ = write!(line, " {name}={}", show(value));
        }
        line.push_str(" |");
        for (name, value) in &self.metrics {
            let _ = write!(line, " {name}={}", show(value));
        }
        if !json {
            println!("{line}");
            return;
        }
        eprintln!("{line}");
        let object = |pairs: &[(&'static str, Value)]| {
            let map: Map<String, Value> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            Value::Object(map)
        };
        let mut out = Map::new();
        out.insert("scenario".into(), self.scenario.into());
        out.insert("label".into(), label.into());
        out.insert("params".into(), object(&self.params));
        out.insert("metrics".into(), object(&self.metrics));
        println!("{}", Value::Object(out));
    }
}

/// A value as the human line shows it: strings without quotes.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
