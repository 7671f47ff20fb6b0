//! `gateway top`: a live view of a running gateway, from its admin API's `/stats`: requests per
//! second, error rates and latency percentiles per tool and tenant, the kernel's drops per
//! tenant, and the latency distribution of the busiest tool. `--once` (and any run without a
//! terminal) prints the same figures once as plain text, for scripts and ssh; an admin API that
//! cannot be read is said plainly, never a blank screen.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Bar, BarChart, BarGroup, Block, Paragraph, Row, Table},
};
use serde_json::Value;

pub struct Options {
    pub admin: String,
    pub token: Option<String>,
    pub window: String,
    pub interval: Duration,
    /// Print the figures once as plain text and exit (also what happens without a terminal).
    pub once: bool,
}

fn fetch(o: &Options) -> anyhow::Result<Value> {
    let url = format!("http://{}/stats?window={}", o.admin, o.window);
    let mut req = ureq::get(&url)
        .config()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build();
    if let Some(t) = &o.token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let mut resp = req
        .call()
        .map_err(|e| anyhow::anyhow!("cannot reach the admin API at {}: {e}", o.admin))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    match status {
        200 => {}
        401 => anyhow::bail!(
            "the admin API at {} refused the token (401): {}",
            o.admin,
            if o.token.is_some() {
                "the token given is not the gateway's admin token"
            } else {
                "it needs one; pass --token-env VAR with the token in $VAR"
            }
        ),
        s => {
            let why = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            anyhow::bail!("the admin API at {} answered {s}: {why}", o.admin)
        }
    }
    serde_json::from_str(&text).context("the answer from /stats is not JSON")
}

/// One line of totals over every route: rate, requests and error share.
fn totals(stats: &Value) -> String {
    let routes = series(stats, "route");
    let rps: f64 = routes
        .iter()
        .map(|r| r["rps"].as_f64().unwrap_or(0.0))
        .sum();
    let count: u64 = routes
        .iter()
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    let errors: u64 = routes
        .iter()
        .map(|r| r["errors"].as_u64().unwrap_or(0))
        .sum();
    format!(
        "total {rps:.1} req/s   {count} requests   errors {:.2}%",
        errors as f64 * 100.0 / count.max(1) as f64
    )
}

/// The cells of one series row: name, req/s, err%, p50, p90, p99, p99.9, max, gw p99, up p99.
const COLUMNS: [&str; 9] = [
    "req/s", "err%", "p50", "p90", "p99", "p99.9", "max", "gw p99", "up p99",
];

fn cells(s: &Value) -> [String; 10] {
    let count = s["count"].as_u64().unwrap_or(0).max(1);
    let err = s["errors"].as_u64().unwrap_or(0) as f64 * 100.0 / count as f64;
    let t = &s["total_us"];
    [
        shown_name(s["name"].as_str().unwrap_or("")),
        format!("{:.1}", s["rps"].as_f64().unwrap_or(0.0)),
        format!("{err:.1}%"),
        us(&t["p50"]),
        us(&t["p90"]),
        us(&t["p99"]),
        us(&t["p999"]),
        us(&t["max"]),
        us(&s["gateway_us"]["p99"]),
        us(&s["upstream_us"]["p99"]),
    ]
}

/// Widest name shown in the first column.
const NAME_WIDTH: usize = 21;

/// A series' name as shown: a tool's name is the client's to choose, so every character but
/// printable ASCII and letters and digits is shown escaped (`\u{202e}`: a space, a zero-width
/// space, a bidi override, a line separator), and a name wider than its column is cut with
/// `…` (a name padded with spaces and figures printed columns of its own).
fn shown_name(name: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_graphic() || (!c.is_ascii() && c.is_alphanumeric()) {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    if out.chars().count() > NAME_WIDTH {
        out = out.chars().take(NAME_WIDTH - 1).collect();
        out.push('…');
    }
    out
}

/// The figures as plain text (`--once`).
pub fn plain(o: &Options, stats: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "mcp-gateway {}   window {}\n{}\n",
        o.admin,
        o.window,
        totals(stats)
    );
    for (title, dim) in [("TOOL", "tool"), ("TENANT", "tenant"), ("ROUTE", "route")] {
        let _ = write!(out, "\n{title:<22}");
        for c in COLUMNS {
            let _ = write!(out, " {c:>9}");
        }
        out.push('\n');
        for s in series(stats, dim) {
            let c = cells(s);
            let _ = write!(out, "{:<22}", c[0]);
            for v in &c[1..] {
                let _ = write!(out, " {v:>9}");
            }
            out.push('\n');
        }
    }
    if let Some(kernel) = stats["kernel"].as_object() {
        let _ = writeln!(out, "\nKERNEL (packets since start)");
        for (tenant, verdicts) in kernel {
            let _ = writeln!(out, "{tenant:<22} {verdicts}");
        }
    }
    out
}

/// Kernel packets per tenant and verdict, and when they were read: rates come from two reads.
struct KernelSample {
    at: Instant,
    counts: Value,
}

struct View {
    stats: Option<Value>,
    error: Option<String>,
    kernel_rates: Vec<(String, f64, f64)>,
    previous: Option<KernelSample>,
}

fn us(v: &Value) -> String {
    match v.as_u64() {
        None => "-".into(),
        Some(n) if n >= 1_000_000 => format!("{:.2}s", n as f64 / 1e6),
        Some(n) if n >= 1_000 => format!("{:.1}ms", n as f64 / 1e3),
        Some(n) => format!("{n}µs"),
    }
}

fn series<'a>(stats: &'a Value, dim: &str) -> Vec<&'a Value> {
    let mut out: Vec<&Value> = stats["series"]
        .as_array()
        .map(|a| a.iter().filter(|s| s["dim"] == dim).collect())
        .unwrap_or_default();
    out.sort_by(|a, b| {
        b["count"]
            .as_u64()
            .unwrap_or(0)
            .cmp(&a["count"].as_u64().unwrap_or(0))
    });
    out
}

fn series_table<'a>(title: &'a str, rows: &[&Value]) -> Table<'a> {
    let header = Row::new([
        title, "req/s", "err%", "p50", "p90", "p99", "p99.9", "max", "gw p99", "up p99",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let body: Vec<Row> = rows.iter().map(|s| Row::new(cells(s))).collect();
    let widths = [
        Constraint::Length(22),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
    ];
    Table::new(body, widths).header(header)
}

fn draw(f: &mut Frame, o: &Options, v: &View) {
    let [head, tools, tenants, kernel, hist] = Layout::vertical([
        // Two lines inside the border: the title and the totals (or what went wrong).
        Constraint::Length(4),
        Constraint::Min(6),
        Constraint::Min(5),
        Constraint::Length(5),
        Constraint::Length(9),
    ])
    .areas(f.area());
    let mut lines = vec![Line::from(format!(
        "mcp-gateway top   {}   window {}   every {:?}   q: quit",
        o.admin, o.window, o.interval
    ))];
    match (&v.stats, &v.error) {
        (_, Some(e)) => lines.push(
            Line::from(format!("ERROR: {e}")).style(Style::default().add_modifier(Modifier::BOLD)),
        ),
        (Some(s), None) => lines.push(Line::from(totals(s))),
        (None, None) => lines.push(Line::from("waiting for the first answer…")),
    }
    f.render_widget(Paragraph::new(lines).block(Block::bordered()), head);
    let Some(stats) = &v.stats else { return };
    let t = series(stats, "tool");
    f.render_widget(
        series_table("TOOL", &t).block(Block::bordered().title(" tools ")),
        tools,
    );
    f.render_widget(
        series_table("TENANT", &series(stats, "tenant"))
            .block(Block::bordered().title(" tenants ")),
        tenants,
    );
    let krows: Vec<Row> = v
        .kernel_rates
        .iter()
        .map(|(t, pass, drop)| Row::new([t.clone(), format!("{pass:.1}"), format!("{drop:.1}")]))
        .collect();
    f.render_widget(
        Table::new(
            krows,
            [
                Constraint::Length(22),
                Constraint::Length(14),
                Constraint::Length(14),
            ],
        )
        .header(
            Row::new(["TENANT", "passed pkt/s", "dropped pkt/s"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(" kernel (XDP) ")),
        kernel,
    );
    let busiest = t
        .first()
        .copied()
        .or_else(|| series(stats, "route").first().copied());
    if let Some(s) = busiest {
        let bars: Vec<Bar> = s["distribution"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|b| Some((b[0].as_u64()?, b[1].as_u64()?)))
                    .skip_while(|(_, n)| *n == 0)
                    .map(|(upper, n)| {
                        Bar::default()
                            .value(n)
                            .label(Line::from(format!("≤{}", us(&upper.into()))))
                    })
                    .collect()
            })
            .unwrap_or_default();
        f.render_widget(
            BarChart::default()
                .block(Block::bordered().title(format!(
                    " latency of {} `{}` (requests per bucket) ",
                    s["dim"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or("")
                )))
                .bar_width(7)
                .bar_gap(1)
                .data(BarGroup::default().bars(&bars)),
            hist,
        );
    }
}

fn update(o: &Options, v: &mut View) {
    match fetch(o) {
        Ok(stats) => {
            if stats["kernel"].is_object() {
                let now = Instant::now();
                if let Some(prev) = &v.previous {
                    let secs = now.duration_since(prev.at).as_secs_f64().max(0.001);
                    v.kernel_rates = stats["kernel"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(tenant, verdicts)| {
                            let delta = |verdict: &str| {
                                verdicts[verdict].as_u64().unwrap_or(0).saturating_sub(
                                    prev.counts[tenant][verdict].as_u64().unwrap_or(0),
                                ) as f64
                            };
                            let dropped: f64 = [
                                "denied",
                                "banned",
                                "tenant_rate",
                                "source_rate",
                                "over_cap",
                                "malformed",
                            ]
                            .iter()
                            .map(|d| delta(d))
                            .sum();
                            (tenant.clone(), delta("passed") / secs, dropped / secs)
                        })
                        .collect();
                }
                v.previous = Some(KernelSample {
                    at: now,
                    counts: stats["kernel"].clone(),
                });
            }
            v.stats = Some(stats);
            v.error = None;
        }
        Err(e) => v.error = Some(format!("{e:#}")),
    }
}

/// Runs the live view until `q` or Esc; with `--once` or without a terminal, prints the figures
/// once (an admin API that cannot be read is an error, said on stderr).
pub fn run(o: Options) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    if o.once || !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        let stats = fetch(&o)?;
        print!("{}", plain(&o, &stats));
        return Ok(());
    }
    let mut terminal = ratatui::try_init().context("setting up the terminal (try --once)")?;
    let mut view = View {
        stats: None,
        error: None,
        kernel_rates: Vec::new(),
        previous: None,
    };
    let result = (|| -> anyhow::Result<()> {
        loop {
            update(&o, &mut view);
            terminal.draw(|f| draw(f, &o, &view))?;
            let deadline = Instant::now() + o.interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if event::poll(left)?
                    && let Event::Key(k) = event::read()?
                    && matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                {
                    return Ok(());
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::shown_name;

    #[test]
    fn a_name_cannot_pose_as_another_or_print_columns_of_its_own() {
        assert_eq!(shown_name("echo"), "echo");
        assert_eq!(shown_name("échø_1.2-x"), "échø_1.2-x");
        assert_eq!(shown_name("echo\u{200b}"), "echo\\u{200b}");
        assert_eq!(shown_name("\u{202e}ohce_eteled"), "\\u{202e}ohce_eteled");
        assert_eq!(shown_name("a\u{2028}b"), "a\\u{2028}b");
        let padded = shown_name("echo      9999.0      0.0%");
        assert!(
            padded.chars().count() <= 21 && padded.ends_with('…'),
            "{padded}"
        );
    }
}
