//! Application metrics: the number a command prints, or the TCP connections established to a
//! port, read the same way whether from this host's `/proc` or from a guest's.

/// The number a metric command printed first ("42", "17.5 requests").
pub fn parse_number(output: &str) -> Result<f64, String> {
    let first = output
        .split_whitespace()
        .next()
        .ok_or_else(|| "the metric command printed nothing; it must print a number".to_string())?;
    match first.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!(
            "the metric command printed {:?}, not a number",
            first.chars().take(40).collect::<String>()
        )),
    }
}

/// TCP connections in state ESTABLISHED whose local port is `port`, from the text of
/// `/proc/net/tcp` and `/proc/net/tcp6` (one after the other).
pub fn established_on(text: &str, port: u16) -> u32 {
    const ESTABLISHED: &str = "01";
    text.lines()
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let (Some(_slot), Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            state == ESTABLISHED
                && local
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_the_first_number_printed() {
        assert_eq!(parse_number("42\n"), Ok(42.0));
        assert_eq!(parse_number("  17.5 requests/s"), Ok(17.5));
        assert!(parse_number("").unwrap_err().contains("printed nothing"));
        assert!(
            parse_number("busy")
                .unwrap_err()
                .contains("\"busy\", not a number")
        );
        assert!(parse_number("inf").is_err());
    }

    #[test]
    fn connections_are_counted_by_local_port_and_state() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:D2A4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:D2A6 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0 0 0 0 0 0
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:E000 01 00000000:00000000
";
        // 0x1F90 = 8080: one listening (0A), two established (one v4, one v6), one in
        // TIME_WAIT (06); the client end of a connection has another local port.
        assert_eq!(established_on(text, 8080), 2);
        assert_eq!(established_on(text, 53924), 1);
        assert_eq!(established_on(text, 22), 0);
    }

    #[test]
    fn this_hosts_own_connection_is_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert_eq!(established_on(&text, port), 1);
    }
}
