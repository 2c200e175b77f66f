//! Loading, pinning and attaching the socket load-balancing programs.
//!
//! Maps are pinned by name under `<bpffs>/<dir>/` (the C definitions ask for pinning); an agent
//! that starts where an earlier one left maps reuses them, entries and all. Each program's
//! cgroup link is pinned under `<dir>/links/`; while a pinned link exists the program stays
//! attached, also while no agent runs, so a restart never interrupts load balancing. The
//! attached cgroup is recorded next to the links: a different `--cgroup` detaches the old
//! links first.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::programs::CgroupAttachMode;
use aya::programs::links::FdLink;
use aya::{Ebpf, EbpfLoader};

use crate::maps::{
    self, BackendVal, ConfigVal, GroupsVal, IpcacheAddr, IpcacheVal, SlotKey, SvcKey, SvcVal,
};

/// The compiled programs (built from `bpf/sock_lb.c` by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_lb.o"));

/// Every program (its hook is its section in the object).
pub const PROGRAMS: [&str; 11] = [
    "cm_connect4",
    "cm_connect6",
    "cm_sendmsg4",
    "cm_sendmsg6",
    "cm_recvmsg4",
    "cm_recvmsg6",
    "cm_getpeername4",
    "cm_getpeername6",
    "cm_sockops",
    "cm_release",
    "cm_ingress",
];

/// Loads `name` and attaches it to `cg`, returning the link to pin.
fn attach(ebpf: &mut Ebpf, name: &str, cg: &File) -> Result<FdLink, String> {
    // The three cgroup program types share the load → attach → take the link steps; aya gives
    // them no common trait, so the steps are spelled once here for each.
    macro_rules! load_attach {
        ($p:expr) => {{
            load_prog($p.load())?;
            let id = $p
                .attach(cg, CgroupAttachMode::Single)
                .map_err(|e| e.to_string())?;
            $p.take_link(id)
                .map_err(|e| e.to_string())?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| e.to_string())?
        }};
    }
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| "missing from the object".to_owned())?;
    let link: FdLink = match prog {
        aya::programs::Program::CgroupSockAddr(p) => load_attach!(p),
        aya::programs::Program::SockOps(p) => load_attach!(p),
        aya::programs::Program::CgroupSock(p) => load_attach!(p),
        aya::programs::Program::CgroupSkb(p) => {
            load_prog(p.load())?;
            let id = p
                .attach(
                    cg,
                    aya::programs::CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map_err(|e| e.to_string())?;
            p.take_link(id)
                .map_err(|e| e.to_string())?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| e.to_string())?
        }
        other => return Err(format!("unexpected program type {:?}", other.prog_type())),
    };
    Ok(link)
}

fn load_prog(r: Result<(), aya::programs::ProgramError>) -> Result<(), String> {
    r.map_err(|e| match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            format!(
                "load: {io_error}; verifier: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
        e => format!("load: {e}"),
    })
}

/// Why the datapath could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Loading the object or a program failed (verifier, permissions, missing bpffs).
    #[error("load eBPF: {0}")]
    Load(String),
    /// Attaching or pinning a program failed.
    #[error("attach {program} to {cgroup}: {reason}")]
    Attach {
        /// The program.
        program: String,
        /// The cgroup.
        cgroup: PathBuf,
        /// Why.
        reason: String,
    },
    /// A map operation failed.
    #[error("map {map}: {reason}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        reason: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The loaded, attached datapath and its maps.
pub struct Datapath {
    dir: PathBuf,
    /// Services: frontend → (ID, counts).
    pub services: HashMap<MapData, SvcKey, SvcVal>,
    /// Backends: ID → backend (an array; unused entries are zero).
    pub backends: Array<MapData, BackendVal>,
    /// Slots: (service, tier, slot) → backend ID.
    pub slots: HashMap<MapData, SlotKey, u32>,
    /// Cluster groups of weighted tiers, by the index in the service's value (an array).
    pub groups: Array<MapData, GroupsVal>,
    /// Backend address → ID (for sock_ops).
    pub backend_ids: HashMap<MapData, maps::SockaddrKey, maps::BackendRef>,
    /// IP cache: prefix → identity, cluster.
    pub ipcache: LpmTrie<MapData, IpcacheAddr, IpcacheVal>,
    /// The programs' settings (one entry).
    pub config: Array<MapData, ConfigVal>,
    /// Per-CPU counters of the programs ([`maps::STAT_NAMES`]).
    pub stats: PerCpuArray<MapData, u64>,
    /// Health events from the kernel; taken by the agent's reader.
    pub events: Option<RingBuf<MapData>>,
    /// Flow events from the kernel; taken by the agent's flow reader.
    pub flows: Option<RingBuf<MapData>>,
    /// The generation of the policy state the verdict cache is valid for (`CM_POLICY_GEN[0]`,
    /// mapped: changed atomically), and the map (`[1]`: the cache's hash seed).
    policy_gen: crate::batch::SharedU64,
    policy_gen_map: Array<MapData, u64>,
    /// Local endpoints: cgroup ID → identity and enforced directions.
    pub endpoints: HashMap<MapData, u64, maps::EndpointVal>,
    /// Policy entries: (local, peer, direction, protocol) → port set (see [`crate::policy`]).
    pub policy: HashMap<MapData, maps::PolicyKey, u32>,
    /// The port sets.
    pub policy_sets: HashMap<MapData, u32, maps::PortSetVal>,
    /// The IP cache's host entries by exact address.
    pub ipcache_hosts: HashMap<MapData, IpcacheAddr, IpcacheVal>,
    /// Policy verdict counters (per direction, outcome and peer cluster).
    pub policy_stats: PerCpuArray<MapData, u64>,
    sizes: maps::Sizes,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("dir", &self.dir).finish()
    }
}

fn take_any(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or_else(|| Error::Map {
        map: name,
        reason: "missing from the object".into(),
    })
}

fn take<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or_else(|| Error::Map {
        map: name,
        reason: "missing from the object".into(),
    })?;
    HashMap::try_from(map).map_err(|e| Error::Map {
        map: name,
        reason: e.to_string(),
    })
}

fn take_array<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<Array<MapData, V>, Error> {
    Array::try_from(take_any(ebpf, name)?).map_err(|e| Error::Map {
        map: name,
        reason: e.to_string(),
    })
}

impl Datapath {
    /// Loads (or reuses) the maps under `dir`, at the default sizes, and makes sure every
    /// program is attached to `cgroup` through a pinned link.
    pub fn open(dir: &Path, cgroup: &Path) -> Result<Self, Error> {
        Self::open_sized(dir, cgroup, maps::Sizes::default())
    }

    /// [`Datapath::open`] with the sized maps holding `sizes` entries. Maps pinned earlier at
    /// another size are refused (resizing needs a drain: the pins must go).
    pub fn open_sized(dir: &Path, cgroup: &Path, sizes: maps::Sizes) -> Result<Self, Error> {
        let links = dir.join("links");
        std::fs::create_dir_all(&links).map_err(io("create", &links))?;
        // bpffs holds no regular files: the attached cgroup is recorded as a directory name.
        let record = dir.join(format!(
            "cgroup-{}",
            cgroup.display().to_string().replace('/', "%")
        ));
        let recorded: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io("read", dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("cgroup-"))
            })
            .collect();
        for old in recorded.iter().filter(|p| **p != record) {
            tracing::warn!(old = %old.display(), new = %cgroup.display(), "the cgroup changed; detaching from the old one");
            detach(dir)?;
            std::fs::remove_dir(old).map_err(io("remove", old))?;
        }
        check_layout(dir, sizes)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(dir);
        for (name, entries) in sizes.maps() {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| Error::Load(e.to_string()))?;
        let cg = File::open(cgroup).map_err(io("open cgroup", cgroup))?;
        for name in PROGRAMS {
            let link_path = links.join(name);
            if link_path.exists() {
                continue;
            }
            let link = attach(&mut ebpf, name, &cg).map_err(|reason| Error::Attach {
                program: name.into(),
                cgroup: cgroup.to_owned(),
                reason,
            })?;
            link.pin(&link_path).map_err(|e| Error::Attach {
                program: name.into(),
                cgroup: cgroup.to_owned(),
                reason: format!("pin: {e}"),
            })?;
            tracing::info!(program = name, cgroup = %cgroup.display(), "attached");
        }
        if !record.exists() {
            std::fs::create_dir(&record).map_err(io("create", &record))?;
        }
        let services = take(&mut ebpf, maps::SERVICES)?;
        let backends = take_array(&mut ebpf, maps::BACKENDS)?;
        let slots = take(&mut ebpf, maps::SLOTS)?;
        let groups = take_array(&mut ebpf, maps::GROUPS)?;
        let backend_ids = take(&mut ebpf, maps::BACKEND_IDS)?;
        let ipcache_map = ebpf.take_map(maps::IPCACHE).ok_or_else(|| Error::Map {
            map: maps::IPCACHE,
            reason: "missing from the object".into(),
        })?;
        let ipcache = LpmTrie::try_from(ipcache_map).map_err(|e| Error::Map {
            map: maps::IPCACHE,
            reason: e.to_string(),
        })?;
        let config =
            Array::try_from(take_any(&mut ebpf, maps::CONFIG)?).map_err(|e| Error::Map {
                map: maps::CONFIG,
                reason: e.to_string(),
            })?;
        let stats =
            PerCpuArray::try_from(take_any(&mut ebpf, maps::STATS)?).map_err(|e| Error::Map {
                map: maps::STATS,
                reason: e.to_string(),
            })?;
        let events = RingBuf::try_from(take_any(&mut ebpf, maps::HEALTH_EVENTS)?).map_err(|e| {
            Error::Map {
                map: maps::HEALTH_EVENTS,
                reason: e.to_string(),
            }
        })?;
        let flows =
            RingBuf::try_from(take_any(&mut ebpf, maps::FLOWS)?).map_err(|e| Error::Map {
                map: maps::FLOWS,
                reason: e.to_string(),
            })?;
        let mut policy_gen_map: Array<MapData, u64> =
            Array::try_from(take_any(&mut ebpf, maps::POLICY_GEN)?).map_err(|e| Error::Map {
                map: maps::POLICY_GEN,
                reason: e.to_string(),
            })?;
        let policy_gen = {
            use aya::maps::IterableMap;
            use std::os::fd::AsFd;
            crate::batch::SharedU64::map(policy_gen_map.map().fd().as_fd()).map_err(|e| {
                Error::Map {
                    map: maps::POLICY_GEN,
                    reason: format!(
                        "mapping the generation ({e}): a map pinned by an older agent (not \
                     mmapable)? drain the node and remove the pins before starting this agent"
                    ),
                }
            })?
        };
        // The cache's hash seed: random once, kept with the pins.
        if policy_gen_map.get(&GEN_SEED, 0).unwrap_or(0) == 0 {
            let seed = random_seed().map_err(|e| Error::Map {
                map: maps::POLICY_GEN,
                reason: format!("reading a random seed: {e}"),
            })?;
            policy_gen_map
                .set(GEN_SEED, seed, 0)
                .map_err(|e| Error::Map {
                    map: maps::POLICY_GEN,
                    reason: e.to_string(),
                })?;
        }
        // Whatever the cache holds from before (an agent that stopped between a write and
        // its bump, another version) is stale from here on.
        policy_gen.add(1);
        let endpoints = take(&mut ebpf, maps::ENDPOINTS)?;
        let policy = take(&mut ebpf, maps::POLICY)?;
        let policy_sets = take(&mut ebpf, maps::POLICY_SETS)?;
        let ipcache_hosts = take(&mut ebpf, maps::IPCACHE_HOSTS)?;
        let policy_stats = PerCpuArray::try_from(take_any(&mut ebpf, maps::POLICY_STATS)?)
            .map_err(|e| Error::Map {
                map: maps::POLICY_STATS,
                reason: e.to_string(),
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            endpoints,
            policy,
            policy_sets,
            ipcache_hosts,
            policy_stats,
            services,
            backends,
            slots,
            groups,
            backend_ids,
            ipcache,
            config,
            stats,
            events: Some(events),
            flows: Some(flows),
            policy_gen,
            policy_gen_map,
            sizes,
            _ebpf: ebpf,
        })
    }

    /// How many entries the sized maps hold.
    pub fn sizes(&self) -> maps::Sizes {
        self.sizes
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Entries in the reverse-NAT map (only unconnected UDP writes it; sock_release removes
    /// them).
    pub fn revnat_entries(&self) -> Result<usize, Error> {
        let path = self.dir.join(maps::REVNAT);
        let data = MapData::from_pin(&path).map_err(|e| Error::Map {
            map: maps::REVNAT,
            reason: e.to_string(),
        })?;
        let map: HashMap<MapData, [u8; 32], [u8; 20]> =
            HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(|e| Error::Map {
                map: maps::REVNAT,
                reason: e.to_string(),
            })?;
        Ok(map.keys().count())
    }

    /// Invalidates every entry of the kernel's verdict cache: call after any change of the
    /// policy entries, the port sets or the IP cache is complete.
    pub fn bump_policy_gen(&mut self) {
        self.policy_gen.add(1);
    }

    /// The verdict cache's generation (never 0 once the maps are open).
    pub fn policy_gen(&self) -> u64 {
        self.policy_gen.get()
    }

    /// The verdict cache's hash seed.
    pub fn policy_seed(&self) -> Result<u64, aya::maps::MapError> {
        self.policy_gen_map.get(&GEN_SEED, 0)
    }

    /// Writes the programs' settings.
    pub fn set_config(&mut self, c: &maps::Config) -> Result<(), Error> {
        self.config
            .set(0, maps::config_val(c), 0)
            .map_err(|e| Error::Map {
                map: maps::CONFIG,
                reason: e.to_string(),
            })
    }

    /// Changes some of the programs' settings, keeping the others.
    pub fn update_config(&mut self, f: impl FnOnce(&mut maps::Config)) -> Result<(), Error> {
        let mut c = self
            .config
            .get(&0, 0)
            .map(|v| maps::parse_config_val(&v))
            .unwrap_or_default();
        f(&mut c);
        self.set_config(&c)
    }

    /// The programs' counters, summed over CPUs, named as [`maps::STAT_NAMES`].
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, Error> {
        let mut out = Vec::new();
        for (i, name) in maps::STAT_NAMES.iter().enumerate() {
            let per_cpu = self.stats.get(&(i as u32), 0).map_err(|e| Error::Map {
                map: maps::STATS,
                reason: e.to_string(),
            })?;
            out.push((*name, per_cpu.iter().sum()));
        }
        Ok(out)
    }
}

/// Waits until `ring` has records or `timeout` (under a second) passes; an interrupted wait
/// counts as a wake-up. The readers of the health and flow rings poll this way on their own
/// threads.
pub fn wait_ring(ring: &RingBuf<MapData>, timeout: std::time::Duration) -> rustix::io::Result<()> {
    use std::os::fd::AsFd;
    let fd = ring.as_fd();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `CM_POLICY_GEN[1]`: the verdict cache's hash seed.
const GEN_SEED: u32 = 1;

/// Eight random bytes from the kernel.
fn random_seed() -> std::io::Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_ne_bytes(b).max(1))
}

/// Refuses pinned maps whose key or value size differs from this agent's layout, or whose
/// capacity differs from `sizes`.
fn check_layout(dir: &Path, sizes: maps::Sizes) -> Result<(), Error> {
    let sized = sizes.maps();
    for (name, key, value) in maps::LAYOUT {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| Error::Map {
            map: name,
            reason: format!("reading the pinned map's layout: {e}"),
        })?;
        if (info.key_size(), info.value_size()) != (key, value) {
            return Err(Error::Map {
                map: name,
                reason: format!(
                    "the pinned map under {} has key/value sizes {}/{}, this agent's layout is \
                     {key}/{value}: the datapath layout changed between versions; drain the node \
                     and remove the pins (the directory) before starting this agent",
                    dir.display(),
                    info.key_size(),
                    info.value_size()
                ),
            });
        }
        // Hash maps until the datapath v2's array-indexed backends and groups.
        if [maps::BACKENDS, maps::GROUPS].contains(&name)
            && !matches!(info.map_type(), Ok(aya::maps::MapType::Array))
        {
            return Err(Error::Map {
                map: name,
                reason: format!(
                    "the pinned map under {} is a hash map, this agent's is an array: the \
                     datapath layout changed between versions; drain the node and remove the \
                     pins (the directory) before starting this agent",
                    dir.display()
                ),
            });
        }
        if let Some((_, entries)) = sized.iter().find(|(n, _)| *n == name)
            && info.max_entries() != *entries
        {
            return Err(Error::Map {
                map: name,
                reason: format!(
                    "the pinned map under {} holds {} entries, this agent is configured for \
                     {entries} (--max-services): resizing needs a drain; remove the pins (the \
                     directory) first, or keep the old --max-services",
                    dir.display(),
                    info.max_entries()
                ),
            });
        }
    }
    Ok(())
}

/// Detaches every program (removes the pinned links).
pub fn detach(dir: &Path) -> Result<(), Error> {
    let links = dir.join("links");
    for name in PROGRAMS {
        let p = links.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io("unpin", &p))?;
        }
    }
    Ok(())
}

/// Removes everything the datapath pinned under `dir`: links (detaching the programs), maps
/// and the directory.
pub fn remove(dir: &Path) -> Result<(), Error> {
    detach(dir)?;
    for name in maps::ALL {
        let p = dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io("unpin", &p))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("cgroup-") {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir.join("links"));
    let _ = std::fs::remove_dir(dir);
    Ok(())
}
