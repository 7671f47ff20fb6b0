//! Two network namespaces joined by a veth pair, on 198.18.0.0/24: the gateway side has
//! 198.18.0.1, the client side the addresses it is given. Dropping the topology deletes both
//! namespaces, which also removes the veth pair and anything attached to it.

use std::{fs::File, net::Ipv4Addr, process::Command};

use nix::sched::{CloneFlags, setns};

pub struct Topology {
    pub gw: String,
    pub client: String,
    /// The veth end inside the gateway namespace.
    pub gw_if: String,
    /// The veth end inside the client namespace.
    pub client_if: String,
}

pub const GW_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Topology {
    /// Creates the namespaces; `client_addrs` are the client side's addresses (all in 198.18.0.0/24).
    pub fn new(client_addrs: &[Ipv4Addr]) -> Self {
        crate::require_root();
        let tag = crate::unique("g");
        let t = Topology {
            gw: format!("{tag}gw"),
            client: format!("{tag}cl"),
            gw_if: format!("{tag}g"),
            client_if: format!("{tag}c"),
        };
        ip(&["netns", "add", &t.gw]);
        // From here on, Drop cleans up even if a later step fails.
        ip(&["netns", "add", &t.client]);
        ip(&["-n", &t.gw, "link", "set", "lo", "up"]);
        ip(&["-n", &t.client, "link", "set", "lo", "up"]);
        t.link(client_addrs);
        t
    }

    /// Deletes the veth pair (as a host deleting an interface to make it again does).
    pub fn unlink(&self) {
        ip(&["-n", &self.gw, "link", "del", &self.gw_if]);
    }

    /// Makes the veth pair (again), with the addresses, up.
    pub fn link(&self, client_addrs: &[Ipv4Addr]) {
        let t = self;
        let cl_if = t.client_if.clone();
        ip(&[
            "link", "add", &t.gw_if, "netns", &t.gw, "type", "veth", "peer", "name", &cl_if,
            "netns", &t.client,
        ]);
        ip(&[
            "-n",
            &t.gw,
            "addr",
            "add",
            &format!("{GW_ADDR}/24"),
            "dev",
            &t.gw_if,
        ]);
        for a in client_addrs {
            ip(&[
                "-n",
                &t.client,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &cl_if,
            ]);
        }
        for (ns, dev) in [(&t.gw, &t.gw_if), (&t.client, &cl_if)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// The MAC address of interface `dev` in namespace `ns`.
    pub fn mac(ns: &str, dev: &str) -> [u8; 6] {
        let json = ip_output(&["-n", ns, "-j", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let text = v[0]["address"].as_str().expect("link address");
        let mut mac = [0u8; 6];
        for (b, part) in mac.iter_mut().zip(text.split(':')) {
            *b = u8::from_str_radix(part, 16).expect("hex octet");
        }
        mac
    }

    /// `ip link show` of the gateway's veth end (shows `xdp`/`xdpgeneric` and the program id).
    pub fn gw_link(&self) -> String {
        ip_output(&["-n", &self.gw, "-d", "link", "show", "dev", &self.gw_if])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.gw, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The hub's address on a [`Lan`]'s bridge.
pub const HUB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// Namespaces joined by a bridge, as hosts on one LAN: a hub namespace holding the bridge (at
/// [`HUB_ADDR`]), a client namespace with the given addresses, and `hosts` host namespaces,
/// host `i` at 198.18.0.(11 + i). Each member's side of its veth pair is the interface an XDP
/// program attaches to. Dropped: every namespace, and with them the links.
pub struct Lan {
    pub hub: String,
    pub client: String,
    /// (namespace, interface, address) of each host.
    pub hosts: Vec<(String, String, Ipv4Addr)>,
}

impl Lan {
    pub fn new(client_addrs: &[Ipv4Addr], hosts: u8) -> Self {
        crate::require_root();
        let tag = crate::unique("l");
        let mut lan = Lan {
            hub: format!("{tag}hub"),
            client: format!("{tag}cl"),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &lan.hub]);
        // From here on, Drop cleans up even if a later step fails.
        ip(&["netns", "add", &lan.client]);
        for i in 0..hosts {
            let ns = format!("{tag}h{i}");
            ip(&["netns", "add", &ns]);
            lan.hosts
                .push((ns, format!("{tag}x{i}"), Ipv4Addr::new(198, 18, 0, 11 + i)));
        }
        let hub = lan.hub.clone();
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{HUB_ADDR}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        let mut members: Vec<(String, String, Vec<Ipv4Addr>)> =
            vec![(lan.client.clone(), format!("{tag}c"), client_addrs.to_vec())];
        members.extend(
            lan.hosts
                .iter()
                .map(|(ns, dev, a)| (ns.clone(), dev.clone(), vec![*a])),
        );
        for (i, (ns, dev, addrs)) in members.iter().enumerate() {
            let port = format!("{tag}b{i}");
            ip(&[
                "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &hub,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &port, "up"]);
            for a in addrs {
                ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", dev]);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let hosts = self.hosts.iter().map(|(ns, _, _)| ns);
        for ns in [&self.client, &self.hub].into_iter().chain(hosts) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Makes `cmd` enter network namespace `ns` before it executes. Only the network namespace:
/// `ip netns exec` would also remount /sys and hide the host's bpffs, and with it the pins.
pub fn enter_before_exec(cmd: &mut std::process::Command, ns: &str) {
    use std::os::unix::process::CommandExt as _;
    let netns = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    // SAFETY: setns is async-signal-safe; the closure only calls it.
    unsafe {
        cmd.pre_exec(move || setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    }
}

/// Runs `f` on a thread that has entered namespace `ns`; sockets it creates live there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
            setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}
