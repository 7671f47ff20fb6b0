//! Scenario `config`: configuration scale. A gateway with 100 tenants and 1,000 global tool
//! rules (every 10th with a rate and an argument pattern), against the same gateway with the
//! same tenants and no rule (what the rules themselves cost): resident memory at start, time to
//! ready, each reload through the admin API (`POST /reload`, the same file read, validated,
//! compiled and swapped in) and resident memory after the reloads.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::peers::{KillOnDrop, free_port};

use crate::{env::Environment, proxy::Proc};

const TENANTS: usize = 100;
const RULES: usize = 1_000;
/// The goals (issue 18): resident memory and the time of one reload, 100 tenants × 1,000 rules.
const GOAL_RSS_MIB: f64 = 50.0;
const GOAL_RELOAD_MS: f64 = 200.0;

/// The configuration: `tenants` tenants (each its own /24), `rules` rules in `[policy]` shared
/// by all of them (every 10th names the upstream, with a rate and an argument pattern; a third
/// of the others deny), one upstream that is never called.
pub fn config(tenants: usize, rules: usize, port: u16, admin: u16, state: &Path) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "[gateway]\ninstance = \"cs{port}\"\nworkers = 1\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
         [admin]\naddress = \"127.0.0.1:{admin}\"\n[kernel]\nenabled = false\ndefault_tenant = \"t0\"\n\
         [state]\npath = \"{}\"\n",
        state.display()
    );
    for t in 0..tenants {
        let _ = writeln!(
            out,
            "[[tenants]]\nname = \"t{t}\"\nid = {}\nsources = [\"10.{}.{}.0/24\"]",
            t + 1,
            t / 250,
            t % 250
        );
    }
    out.push_str("[policy]\ndefault_action = \"allow\"\n");
    for r in 0..rules {
        if r % 10 == 0 {
            let _ = writeln!(
                out,
                "[[policy.tools]]\nmatch = \"up/tool_{r}_*\"\naction = \"allow\"\nrequests_per_sec = 100\n\
                 [[policy.tools.arguments]]\npointer = \"/path\"\npattern = \"^/srv/data{r}/[a-z0-9_/]+$\""
            );
        } else {
            let action = if r % 3 == 0 { "deny" } else { "allow" };
            let _ = writeln!(
                out,
                "[[policy.tools]]\nmatch = \"tool_{r}_*\"\naction = \"{action}\""
            );
        }
    }
    out.push_str(
        "[[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:9/mcp\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n",
    );
    out
}

/// One gateway's figures.
pub struct Measure {
    pub rules: usize,
    /// Transparent huge pages allowed to the allocator (`MIMALLOC_ALLOW_THP=1`; the gateway
    /// turns them off otherwise).
    pub thp: bool,
    pub config_bytes: usize,
    pub ready_ms: f64,
    pub rss_start_mib: f64,
    pub reloads_ms: Vec<f64>,
    pub rss_after_mib: f64,
    pub cpu_s: f64,
}

impl Measure {
    fn reload_stats(&self) -> (f64, f64, f64) {
        let mut v = self.reloads_ms.clone();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }
}

fn measure(rules: usize, thp: bool, reloads: usize) -> anyhow::Result<Measure> {
    let (port, admin) = (free_port(), free_port());
    let stem = std::env::temp_dir().join(format!("bench-config-{rules}-{}", std::process::id()));
    let state = stem.with_extension("state");
    let file = stem.with_extension("toml");
    let text = config(TENANTS, rules, port, admin, &state);
    std::fs::write(&file, &text)?;
    let started = Instant::now();
    let mut cmd = Command::new(crate::proxy::bin("gateway"));
    cmd.args(["run", "--config"])
        .arg(&file)
        .env("RUST_LOG", "error")
        .env_remove("MIMALLOC_ALLOW_THP")
        .stderr(Stdio::null());
    if thp {
        cmd.env("MIMALLOC_ALLOW_THP", "1");
    }
    let gateway = Proc(KillOnDrop(cmd.spawn()?));
    let base = format!("http://127.0.0.1:{admin}");
    let ready_ms = loop {
        if ureq::get(&format!("{base}/readyz")).call().is_ok() {
            break started.elapsed().as_secs_f64() * 1e3;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the gateway with {rules} rules is not ready after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_secs(1));
    let rss_start_mib = crate::headline::rss_mib(gateway.pid());
    let mut reloads_ms = Vec::new();
    for _ in 0..reloads {
        let t = Instant::now();
        ureq::post(&format!("{base}/reload"))
            .send_empty()
            .map_err(|e| anyhow::anyhow!("reload with {rules} rules: {e}"))?;
        reloads_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    std::thread::sleep(Duration::from_secs(1));
    let m = Measure {
        rules,
        thp,
        config_bytes: text.len(),
        ready_ms,
        rss_start_mib,
        reloads_ms,
        rss_after_mib: crate::headline::rss_mib(gateway.pid()),
        cpu_s: gateway.cpu_seconds(),
    };
    drop(gateway);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&state);
    Ok(m)
}

/// Runs the scenario and writes its report.
pub fn report(
    ledger: &mut crate::verdict::Ledger,
    quick: bool,
    env: &Environment,
    dir: &Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let reloads = if quick { 3 } else { 10 };
    let base = measure(0, false, reloads)?;
    let full = measure(RULES, false, reloads)?;
    // The same with transparent huge pages: what the allocator's 2 MiB pages add to RSS.
    let huge = measure(RULES, true, reloads)?;
    let mut md = format!(
        "# Configuration scale: {TENANTS} tenants × {RULES} global rules ({date})\n\n{env}\n\n\
         A gateway (1 worker, kernel program off) started on a file of {TENANTS} tenants and {RULES} tool rules in \
         `[policy]` (shared by every tenant; every 10th names the upstream, with a rate and an argument pattern), \
         against the same tenants without rules, and the same file with the allocator's transparent huge pages \
         allowed (`MIMALLOC_ALLOW_THP=1`; the gateway turns them off unless that variable is set: RSS counts each \
         2 MiB page touched). Ready: from the start of the process to `/readyz` answering 200. \
         Resident memory (VmRSS) 1 s after ready and 1 s after {reloads} reloads (`POST /reload` on the admin API, \
         one after the other, each timed by the client: the file read, validated, compiled and swapped in).\n\n\
         | configuration | file | ready ms | RSS at start MiB | reload ms: min / median / max | RSS after reloads MiB | CPU s |\n\
         |---|---|---|---|---|---|---|\n",
        date = env.date,
        env = env.markdown(),
    );
    for m in [&base, &full, &huge] {
        let (lo, mid, hi) = m.reload_stats();
        md.push_str(&format!(
            "| {TENANTS} tenants, {} rules{} | {} KiB | {:.0} | {:.1} | {lo:.0} / {mid:.0} / {hi:.0} | {:.1} | {:.2} |\n",
            m.rules,
            if m.thp { ", huge pages on" } else { "" },
            m.config_bytes / 1024,
            m.ready_ms,
            m.rss_start_mib,
            m.rss_after_mib,
            m.cpu_s,
        ));
    }
    let (_, base_mid, _) = base.reload_stats();
    let (_, mid, hi) = full.reload_stats();
    let rss = full.rss_start_mib.max(full.rss_after_mib);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    md.push_str(&format!(
        "\nThe rules' own cost: {:+.1} MiB at start, {:+.1} MiB after the reloads, {:+.0} ms per reload (median).\n\n\
         | goal | measured | |\n|---|---|---|\n\
         | resident memory under {GOAL_RSS_MIB:.0} MiB (at start and after the reloads) | {rss:.1} MiB | {} |\n\
         | each reload under {GOAL_RELOAD_MS:.0} ms | max {hi:.0} ms (median {mid:.0}) | {} |\n",
        full.rss_start_mib - base.rss_start_mib,
        full.rss_after_mib - base.rss_after_mib,
        mid - base_mid,
        verdict(rss < GOAL_RSS_MIB),
        verdict(hi < GOAL_RELOAD_MS),
    ));
    let row = |m: &Measure| {
        serde_json::json!({
            "tenants": TENANTS, "rules": m.rules, "thp": m.thp, "config_bytes": m.config_bytes,
            "ready_ms": m.ready_ms, "rss_start_mib": m.rss_start_mib, "reloads_ms": m.reloads_ms,
            "rss_after_reloads_mib": m.rss_after_mib, "cpu_s": m.cpu_s,
        })
    };
    let json = serde_json::json!({
        "scenario": "config", "environment": env.json(), "reloads": reloads,
        "rows": [row(&base), row(&full), row(&huge)],
        "goals": {"rss_mib": GOAL_RSS_MIB, "reload_ms": GOAL_RELOAD_MS,
                  "rss_met": rss < GOAL_RSS_MIB, "reload_met": hi < GOAL_RELOAD_MS},
    });
    crate::write_report(
        ledger,
        dir,
        &format!("{}-config{suffix}", env.date),
        &md,
        &json,
    )
}
