//! Numbers and times as the window and ctl's tables write them.

/// Bytes at a human scale: B, KiB, MiB, GiB or TiB, three significant digits or so.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value < 10.0 {
        format!("{value:.2} {}", UNITS[unit])
    } else if value < 100.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time in seconds.
pub fn date_time(unix_secs: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix_secs.min(i64::MAX as u64) as i64)
    else {
        return String::new();
    };
    format!(
        "{}-{:02}-{:02} {:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_as_written() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(192 << 20), "192 MiB");
        assert_eq!(human_bytes(4 << 30), "4.00 GiB");
        assert_eq!(clock(1_764_590_401_000), "12:00:01");
        assert_eq!(date_time(1_764_590_400), "2025-12-01 12:00");
    }
}
