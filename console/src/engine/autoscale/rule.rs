//! Autoscaling of an application: its rule (a metric, thresholds, a period, how many
//! consecutive periods, a cooldown, and the fewest and most instances), and the decision a
//! rule makes from the periods' means, with the numbers behind it. Pure: the engine measures
//! the periods, keeps the state and carries decisions out; a replay runs a rule over
//! recorded history the same way.

use serde::{Deserialize, Serialize};

/// What a rule watches: the mean over the application's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoscaleMetric {
    /// CPU, in percent of each instance's CPUs (of an application inside VMs: its
    /// processes' share of each VM, from the guest).
    Cpu,
    /// The number the application's instances report (its service file's `metric`:
    /// requests from a command, connections to a port), as a mean over instances.
    AppMetric,
}

impl AutoscaleMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            AutoscaleMetric::Cpu => "cpu",
            AutoscaleMetric::AppMetric => "app-metric",
        }
    }

    /// What follows a value: " %" for CPU; an application's own number has no unit.
    pub fn unit(self) -> &'static str {
        match self {
            AutoscaleMetric::Cpu => " %",
            AutoscaleMetric::AppMetric => "",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "cpu" => Some(AutoscaleMetric::Cpu),
            "app-metric" => Some(AutoscaleMetric::AppMetric),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleRule {
    pub metric: AutoscaleMetric,
    /// Scale out when the mean is above this for `periods` periods in a row.
    pub scale_out_above: f64,
    /// Scale in when the mean is below this for `periods` periods in a row.
    pub scale_in_below: f64,
    pub period_secs: u64,
    pub periods: u32,
    /// No decision for this long after a change.
    pub cooldown_secs: u64,
    pub min_instances: u32,
    pub max_instances: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("scale-in threshold {below} must be below the scale-out threshold {above}")]
    NoHysteresis { below: String, above: String },
    #[error("the minimum of {min} instances is above the maximum of {max}")]
    MinAboveMax { min: u32, max: u32 },
    #[error("at least 1 instance: a minimum of 0 would stop the application")]
    ZeroMinimum,
    #[error("a period of {0} s: periods are 5 s to 1 h")]
    Period(u64),
    #[error("{0} periods in a row: 1 to 60")]
    Periods(u32),
}

impl AutoscaleRule {
    pub fn validate(&self) -> Result<(), RuleError> {
        // NaN thresholds compare as neither: refused too.
        if self.scale_in_below.partial_cmp(&self.scale_out_above) != Some(std::cmp::Ordering::Less)
        {
            return Err(RuleError::NoHysteresis {
                below: self.scale_in_below.to_string(),
                above: self.scale_out_above.to_string(),
            });
        }
        if self.min_instances == 0 {
            return Err(RuleError::ZeroMinimum);
        }
        if self.min_instances > self.max_instances {
            return Err(RuleError::MinAboveMax {
                min: self.min_instances,
                max: self.max_instances,
            });
        }
        if !(5..=3600).contains(&self.period_secs) {
            return Err(RuleError::Period(self.period_secs));
        }
        if !(1..=60).contains(&self.periods) {
            return Err(RuleError::Periods(self.periods));
        }
        Ok(())
    }

    /// "cpu > 75 % or < 20 % for 3×30 s, cooldown 300 s, 1 to 4 instances".
    pub fn describe(&self) -> String {
        format!(
            "{m} > {a}{u} or < {b}{u} for {n}×{p} s, cooldown {c} s, {lo} to {hi} instances",
            m = self.metric.as_str(),
            u = self.metric.unit(),
            a = self.scale_out_above,
            b = self.scale_in_below,
            n = self.periods,
            p = self.period_secs,
            c = self.cooldown_secs,
            lo = self.min_instances,
            hi = self.max_instances,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Out,
    In,
}

/// What a rule decides at the end of a period.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `None`: hold.
    pub change: Option<Change>,
    /// The instance count it leads to.
    pub instances: u32,
    /// The numbers behind it: "cpu mean 83.0 % > 75 % for 3×30 s".
    pub reason: String,
}

/// The decision at `now_secs` for an application of `current` instances, from the means of
/// its last periods (`recent`, oldest first; a missing period is not there) and when it last
/// changed. Within the bounds first; then a change needs `periods` periods in a row past a
/// threshold and no change within the cooldown.
pub fn decide(
    rule: &AutoscaleRule,
    app: &str,
    recent: &[f64],
    current: u32,
    now_secs: u64,
    last_change_secs: Option<u64>,
) -> Decision {
    let hold = |reason: String| Decision {
        change: None,
        instances: current,
        reason,
    };
    if current < rule.min_instances {
        return Decision {
            change: Some(Change::Out),
            instances: rule.min_instances,
            reason: format!(
                "{app} has {current} instances, fewer than its minimum {}",
                rule.min_instances
            ),
        };
    }
    if current > rule.max_instances {
        return Decision {
            change: Some(Change::In),
            instances: rule.max_instances,
            reason: format!(
                "{app} has {current} instances, more than its maximum {}",
                rule.max_instances
            ),
        };
    }
    let n = rule.periods as usize;
    if recent.len() < n {
        return hold(format!("{app}: {} of {n} periods measured", recent.len()));
    }
    let last = &recent[recent.len() - n..];
    let mean = last.iter().sum::<f64>() / n as f64;
    let metric = rule.metric.as_str();
    let unit = rule.metric.unit();
    let window = format!("{n}×{} s", rule.period_secs);
    let cooling = last_change_secs
        .map(|t| now_secs.saturating_sub(t))
        .filter(|since| *since < rule.cooldown_secs);
    if last.iter().all(|v| *v > rule.scale_out_above) {
        if current >= rule.max_instances {
            return hold(format!(
                "{app} {metric} mean {mean:.1}{unit} > {}{unit} for {window}, but it has its maximum {} instances",
                rule.scale_out_above, rule.max_instances
            ));
        }
        if let Some(since) = cooling {
            return hold(format!(
                "{app} {metric} mean {mean:.1}{unit} > {}{unit} for {window}, cooling down ({since} of {} s)",
                rule.scale_out_above, rule.cooldown_secs
            ));
        }
        return Decision {
            change: Some(Change::Out),
            instances: current + 1,
            reason: format!(
                "{app} {metric} mean {mean:.1}{unit} > {}{unit} for {window} → +1 instance",
                rule.scale_out_above
            ),
        };
    }
    if last.iter().all(|v| *v < rule.scale_in_below) {
        if current <= rule.min_instances {
            return hold(format!(
                "{app} {metric} mean {mean:.1}{unit} < {}{unit} for {window}, but it has its minimum {} instances",
                rule.scale_in_below, rule.min_instances
            ));
        }
        if let Some(since) = cooling {
            return hold(format!(
                "{app} {metric} mean {mean:.1}{unit} < {}{unit} for {window}, cooling down ({since} of {} s)",
                rule.scale_in_below, rule.cooldown_secs
            ));
        }
        return Decision {
            change: Some(Change::In),
            instances: current - 1,
            reason: format!(
                "{app} {metric} mean {mean:.1}{unit} < {}{unit} for {window} → −1 instance (the newest)",
                rule.scale_in_below
            ),
        };
    }
    hold(format!(
        "{app} {metric} mean {mean:.1}{unit} within {}–{}{unit}",
        rule.scale_in_below, rule.scale_out_above
    ))
}

/// The mean of each whole period of `samples` (`(unix secs, value)`, in time order), as
/// `(period end, mean)`; periods without a sample are left out.
pub fn period_means(samples: &[(u64, f64)], period_secs: u64) -> Vec<(u64, f64)> {
    let step = period_secs.max(1);
    let mut out: Vec<(u64, f64, u32)> = Vec::new();
    for &(at, v) in samples {
        if !v.is_finite() {
            continue;
        }
        let end = at - at % step + step;
        match out.last_mut() {
            Some(last) if last.0 == end => {
                last.1 += v;
                last.2 += 1;
            }
            _ => out.push((end, v, 1)),
        }
    }
    out.into_iter()
        .map(|(end, sum, n)| (end, sum / f64::from(n)))
        .collect()
}

/// What the rule would have done over recorded period means, starting from `instances`:
/// every change, with its time and reason. The recorded load is taken as it was (the
/// instances the replay adds do not lower it).
pub fn replay(
    rule: &AutoscaleRule,
    app: &str,
    means: &[(u64, f64)],
    instances: u32,
) -> Vec<(u64, Decision)> {
    let mut current = instances;
    let mut last_change = None;
    let mut recent: Vec<f64> = Vec::new();
    let mut changes = Vec::new();
    let mut previous_end: Option<u64> = None;
    for &(end, mean) in means {
        // A gap breaks a run of periods.
        if previous_end.is_some_and(|p| end != p + rule.period_secs) {
            recent.clear();
        }
        previous_end = Some(end);
        recent.push(mean);
        let decision = decide(rule, app, &recent, current, end, last_change);
        if decision.change.is_some() {
            current = decision.instances;
            last_change = Some(end);
            recent.clear();
            changes.push((end, decision));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> AutoscaleRule {
        AutoscaleRule {
            metric: AutoscaleMetric::Cpu,
            scale_out_above: 75.0,
            scale_in_below: 20.0,
            period_secs: 30,
            periods: 3,
            cooldown_secs: 300,
            min_instances: 1,
            max_instances: 3,
        }
    }

    #[test]
    fn three_hot_periods_scale_out_once_and_the_cooldown_holds_the_next() {
        let r = rule();
        // Two hot periods are not enough.
        let d = decide(&r, "web", &[90.0, 80.0], 1, 1000, None);
        assert_eq!(d.change, None);
        // One cool period in the run breaks it.
        let d = decide(&r, "web", &[90.0, 50.0, 80.0], 1, 1000, None);
        assert_eq!(d.change, None);
        assert!(d.reason.contains("within 20–75 %"), "{}", d.reason);
        let d = decide(&r, "web", &[80.0, 83.0, 86.0], 1, 1000, None);
        assert_eq!((d.change, d.instances), (Some(Change::Out), 2));
        assert_eq!(
            d.reason,
            "web cpu mean 83.0 % > 75 % for 3×30 s → +1 instance"
        );
        // Still hot, but within the cooldown of that change.
        let d = decide(&r, "web", &[90.0, 90.0, 90.0], 2, 1200, Some(1000));
        assert_eq!(d.change, None);
        assert!(
            d.reason.contains("cooling down (200 of 300 s)"),
            "{}",
            d.reason
        );
        // At the maximum, it holds and says so.
        let d = decide(&r, "web", &[90.0, 90.0, 90.0], 3, 5000, Some(1000));
        assert_eq!(d.change, None);
        assert!(d.reason.contains("maximum 3"), "{}", d.reason);
    }

    #[test]
    fn cold_periods_scale_in_but_never_below_the_minimum() {
        let r = rule();
        let d = decide(&r, "web", &[5.0, 6.0, 7.0], 2, 1000, None);
        assert_eq!((d.change, d.instances), (Some(Change::In), 1));
        assert!(d.reason.contains("< 20 %"), "{}", d.reason);
        let d = decide(&r, "web", &[5.0, 6.0, 7.0], 1, 1000, None);
        assert_eq!(d.change, None);
        assert!(d.reason.contains("minimum 1"), "{}", d.reason);
        // Outside the bounds, the bounds win at once.
        let d = decide(&r, "web", &[], 0, 0, Some(0));
        assert_eq!((d.change, d.instances), (Some(Change::Out), 1));
        let d = decide(&r, "web", &[], 5, 0, Some(0));
        assert_eq!((d.change, d.instances), (Some(Change::In), 3));
    }

    #[test]
    fn rules_without_hysteresis_or_with_odd_bounds_are_refused() {
        let mut r = rule();
        assert_eq!(r.validate(), Ok(()));
        r.scale_in_below = 80.0;
        assert!(matches!(r.validate(), Err(RuleError::NoHysteresis { .. })));
        let mut r = rule();
        r.min_instances = 4;
        assert!(matches!(r.validate(), Err(RuleError::MinAboveMax { .. })));
        let mut r = rule();
        r.min_instances = 0;
        assert_eq!(r.validate(), Err(RuleError::ZeroMinimum));
        let mut r = rule();
        r.period_secs = 1;
        assert_eq!(r.validate(), Err(RuleError::Period(1)));
    }

    #[test]
    fn a_replay_counts_what_the_rule_would_have_done() {
        let r = AutoscaleRule {
            cooldown_secs: 60,
            ..rule()
        };
        // A morning peak then a quiet afternoon, one sample a second.
        let mut samples = Vec::new();
        for s in 0..1800u64 {
            let v = if s < 600 { 95.0 } else { 5.0 };
            samples.push((s, v));
        }
        let means = period_means(&samples, 30);
        assert_eq!(means.len(), 60);
        assert_eq!(means[0], (30, 95.0));
        let changes = replay(&r, "web", &means, 1);
        let kinds: Vec<(u64, Change)> = changes
            .iter()
            .map(|(t, d)| (*t, d.change.unwrap()))
            .collect();
        // Out at 90 s (3 hot periods), again after the 60 s cooldown and 3 more periods
        // (180 s), then held at the maximum; in twice once it is quiet.
        assert_eq!(
            kinds,
            vec![
                (90, Change::Out),
                (180, Change::Out),
                (690, Change::In),
                (780, Change::In),
            ]
        );
        assert_eq!(changes.last().unwrap().1.instances, 1);
    }
}
