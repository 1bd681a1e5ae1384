//! Working-set profiles: the pages a restore of a checkpoint touched first, recorded by the
//! fetcher and replayed (prefetched first) by later restores of the same checkpoint (fill
//! policy `profile`, REAP-style).
//!
//! It owns the file format, the checkpoint identity that names a profile, and the recorder the
//! fault thread appends to. It does not decide when to record or replay (the fetcher does).
//!
//! # Identity
//!
//! A profile belongs to one checkpoint. Its key is `run-<id>` where `<id>` is the inventory's
//! `dump_criu_run_id` (inventory.img field 13, a UUID that CRIU writes per dump), with every
//! byte outside `[A-Za-z0-9._-]` replaced by `_`; images without it get `hash-<16 hex>`, the
//! 64-bit FNV-1a of inventory.img, pstree.img and every `pagemap-*.img` (sorted by name, each
//! preceded by its name). The file is `<profile dir>/<key>.profile`.
//!
//! # File format, version 1 (all integers little-endian)
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0 | 4 | magic | [`PROFILE_MAGIC`], bytes `DPRF` |
//! | 4 | 2 | version | [`PROFILE_VERSION`]; any other value is refused |
//! | 6 | 2 | reserved | 0 |
//! | 8 | 4 | key length `k` | 1..=[`MAX_KEY_BYTES`] |
//! | 12 | 4 | run count `n` | at most [`MAX_RUNS`] |
//! | 16 | 8 | total pages | sum of the runs' pages, at most [`MAX_PAGES`] |
//! | 24 | `k` | key | UTF-8, must equal the checkpoint's key |
//! | 24+k | 16·n | runs | `pid u32, pages u32 (>= 1), vaddr u64 (page-aligned dump-time address)` in first-touch order |
//! | end-8 | 8 | checksum | FNV-1a 64 of every byte before it |
//!
//! Lengths are checked against the limits and the file size before anything is allocated; a
//! file that fails any check is refused with [`ProfileError::Corrupt`] naming the path and the
//! check, and the fetcher then restores without a profile (and records a fresh one). Files are
//! written to a temporary name and renamed into place.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// `DPRF`.
pub const PROFILE_MAGIC: u32 = u32::from_le_bytes(*b"DPRF");
/// The only version written and read.
pub const PROFILE_VERSION: u16 = 1;
/// Longest key.
pub const MAX_KEY_BYTES: u32 = 256;
/// Most runs in a file.
pub const MAX_RUNS: u32 = 1 << 20;
/// Most pages in a profile (64 GiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 1 << 24;
/// Default profile directory.
pub const DEFAULT_PROFILE_DIR: &str = "/var/lib/distriproc/profiles";
/// Bytes before the key.
const HEADER: usize = 24;
/// Bytes per run.
const RUN: usize = 16;
/// Largest inventory.img read for the identity.
const MAX_INVENTORY_BYTES: u64 = 1 << 20;

/// Errors of profile files.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Reading or writing failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid profile.
    #[error("corrupt profile {}: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The check that failed.
        what: String,
    },
}

/// A run of pages of one task, by dump-time address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileRun {
    /// Virtual pid (pstree.img).
    pub pid: u32,
    /// Pages (>= 1).
    pub pages: u32,
    /// Dump-time address of the first page.
    pub vaddr: u64,
}

/// A working-set profile: runs in first-touch order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    /// The checkpoint key.
    pub key: String,
    /// The runs.
    pub runs: Vec<ProfileRun>,
}

/// 64-bit FNV-1a.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Feeds bytes.
    pub fn update(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct InventoryRunId {
    #[prost(string, optional, tag = "13")]
    dump_criu_run_id: Option<String>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ProfileError + 'a {
    move |source| ProfileError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The key of the checkpoint in `images` (see the module docs).
pub fn checkpoint_key(images: &Path) -> Result<String, ProfileError> {
    let inv = images.join("inventory.img");
    let mut raw = Vec::new();
    File::open(&inv)
        .map_err(io_err("open", &inv))?
        .take(MAX_INVENTORY_BYTES)
        .read_to_end(&mut raw)
        .map_err(io_err("read", &inv))?;
    // inventory.img: type magic u32, entry length u32, inventory_entry.
    if raw.len() >= 8 {
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
        if let Some(msg) = raw.get(8..8 + len) {
            if let Ok(InventoryRunId {
                dump_criu_run_id: Some(id),
            }) = <InventoryRunId as prost::Message>::decode(msg)
            {
                if !id.is_empty() {
                    let clean: String = id
                        .chars()
                        .take(128)
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    return Ok(format!("run-{clean}"));
                }
            }
        }
    }
    let mut h = Fnv::default();
    let mut names = vec!["inventory.img".to_string(), "pstree.img".to_string()];
    let mut maps: Vec<String> = std::fs::read_dir(images)
        .map_err(io_err("list", images))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("pagemap-") && n.ends_with(".img"))
        .collect();
    maps.sort();
    names.extend(maps);
    let mut buf = vec![0u8; 64 << 10];
    for n in &names {
        let p = images.join(n);
        h.update(n.as_bytes());
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("open", &p)(e)),
        };
        loop {
            let got = f.read(&mut buf).map_err(io_err("read", &p))?;
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
        }
    }
    Ok(format!("hash-{:016x}", h.finish()))
}

/// The profile file of `key` under `dir`.
pub fn profile_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.profile"))
}

impl Profile {
    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.pages)).sum()
    }

    /// The file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.key.len() + RUN * self.runs.len() + 8);
        b.extend_from_slice(&PROFILE_MAGIC.to_le_bytes());
        b.extend_from_slice(&PROFILE_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(
            &u32::try_from(self.key.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        b.extend_from_slice(
            &u32::try_from(self.runs.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        b.extend_from_slice(&self.pages().to_le_bytes());
        b.extend_from_slice(self.key.as_bytes());
        for r in &self.runs {
            b.extend_from_slice(&r.pid.to_le_bytes());
            b.extend_from_slice(&r.pages.to_le_bytes());
            b.extend_from_slice(&r.vaddr.to_le_bytes());
        }
        let mut h = Fnv::default();
        h.update(&b);
        b.extend_from_slice(&h.finish().to_le_bytes());
        b
    }

    /// Parses and checks file bytes; `path` is for errors only.
    pub fn decode(b: &[u8], path: &Path) -> Result<Profile, ProfileError> {
        let bad = |what: String| ProfileError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if b.len() < HEADER + 8 {
            return Err(bad(format!("{} bytes is shorter than a header", b.len())));
        }
        if u32_at(0) != PROFILE_MAGIC {
            return Err(bad(format!("bad magic {:#010x}", u32_at(0))));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROFILE_VERSION {
            return Err(bad(format!(
                "version {version}, this build reads {PROFILE_VERSION}"
            )));
        }
        let k = u32_at(8);
        let n = u32_at(12);
        let total = u64_at(16);
        if k == 0 || k > MAX_KEY_BYTES {
            return Err(bad(format!("key length {k} not in 1..={MAX_KEY_BYTES}")));
        }
        if n > MAX_RUNS {
            return Err(bad(format!("{n} runs, limit {MAX_RUNS}")));
        }
        if total > MAX_PAGES {
            return Err(bad(format!("{total} pages, limit {MAX_PAGES}")));
        }
        let want = HEADER + k as usize + RUN * n as usize + 8;
        if b.len() != want {
            return Err(bad(format!(
                "{} bytes, header says {want} ({n} runs)",
                b.len()
            )));
        }
        let body = b.len() - 8;
        let mut h = Fnv::default();
        h.update(&b[..body]);
        if h.finish() != u64_at(body) {
            return Err(bad("checksum mismatch".into()));
        }
        let key = std::str::from_utf8(&b[HEADER..HEADER + k as usize])
            .map_err(|_| bad("key is not UTF-8".into()))?
            .to_string();
        let mut runs = Vec::with_capacity(n as usize);
        let mut sum = 0u64;
        for i in 0..n as usize {
            let o = HEADER + k as usize + i * RUN;
            let r = ProfileRun {
                pid: u32_at(o),
                pages: u32_at(o + 4),
                vaddr: u64_at(o + 8),
            };
            if r.pages == 0 || !r.vaddr.is_multiple_of(4096) {
                return Err(bad(format!(
                    "run {i} (pid {} at {:#x}, {} pages) is empty or unaligned",
                    r.pid, r.vaddr, r.pages
                )));
            }
            sum += u64::from(r.pages);
            runs.push(r);
        }
        if sum != total {
            return Err(bad(format!("runs hold {sum} pages, header says {total}")));
        }
        Ok(Profile { key, runs })
    }

    /// Loads the profile of `key` from `dir`: `Ok(None)` when there is none, an error when the
    /// file is unreadable, corrupt, or belongs to another checkpoint.
    pub fn load(dir: &Path, key: &str) -> Result<Option<Profile>, ProfileError> {
        let path = profile_path(dir, key);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let limit =
            (HEADER as u64) + u64::from(MAX_KEY_BYTES) + (RUN as u64) * u64::from(MAX_RUNS) + 8;
        let len = f.metadata().map_err(io_err("stat", &path))?.len();
        if len > limit {
            return Err(ProfileError::Corrupt {
                path,
                what: format!("{len} bytes, limit {limit}"),
            });
        }
        let mut b = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        f.read_to_end(&mut b).map_err(io_err("read", &path))?;
        let p = Profile::decode(&b, &path)?;
        if p.key != key {
            return Err(ProfileError::Corrupt {
                path,
                what: format!("key {:?} is not the checkpoint's {key:?}", p.key),
            });
        }
        Ok(Some(p))
    }

    /// Writes the profile to `dir` (created if missing) atomically; returns the path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ProfileError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let path = profile_path(dir, &self.key);
        let tmp = dir.join(format!(".{}.profile.tmp-{}", self.key, std::process::id()));
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&self.encode()).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        Ok(path)
    }
}

/// Collects runs on the fault path without allocating: the capacity is reserved up front and
/// recording stops (`full`) when it is used up or [`MAX_PAGES`] is reached.
#[derive(Debug, Default)]
pub struct Recorder {
    runs: Vec<ProfileRun>,
    pages: u64,
    full: bool,
}

impl Recorder {
    /// A recorder for at most `runs` runs.
    pub fn with_capacity(runs: usize) -> Recorder {
        Recorder {
            runs: Vec::with_capacity(runs.min(MAX_RUNS as usize)),
            pages: 0,
            full: false,
        }
    }

    /// Appends `pages` pages of `pid` at dump-time `vaddr`, merged into the last run when
    /// contiguous.
    pub fn push(&mut self, pid: u32, vaddr: u64, pages: u32) {
        if self.full || pages == 0 {
            return;
        }
        if self.pages + u64::from(pages) > MAX_PAGES {
            self.full = true;
            return;
        }
        if let Some(l) = self.runs.last_mut() {
            if l.pid == pid
                && l.vaddr + u64::from(l.pages) * 4096 == vaddr
                && l.pages.checked_add(pages).is_some()
            {
                l.pages += pages;
                self.pages += u64::from(pages);
                return;
            }
        }
        if self.runs.len() == self.runs.capacity() {
            self.full = true;
            return;
        }
        self.runs.push(ProfileRun { pid, pages, vaddr });
        self.pages += u64::from(pages);
    }

    /// Pages recorded.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The profile for `key`.
    pub fn into_profile(self, key: String) -> Profile {
        Profile {
            key,
            runs: self.runs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            key: "run-abc".into(),
            runs: vec![
                ProfileRun {
                    pid: 7,
                    pages: 3,
                    vaddr: 0x7000_0000,
                },
                ProfileRun {
                    pid: 8,
                    pages: 1,
                    vaddr: 0x1000,
                },
            ],
        }
    }

    #[test]
    fn roundtrip_and_atomic_save() {
        let d = tempfile::tempdir().unwrap();
        let p = sample();
        let path = p.save(d.path()).unwrap();
        assert_eq!(path, d.path().join("run-abc.profile"));
        assert_eq!(Profile::load(d.path(), "run-abc").unwrap(), Some(p.clone()));
        assert_eq!(Profile::load(d.path(), "run-other").unwrap(), None);
        assert_eq!(p.pages(), 4);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_files_are_refused_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let good = sample().encode();
        let path = profile_path(d.path(), "run-abc");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "shorter than a header"),
            (
                {
                    let mut b = good.clone();
                    b[0] ^= 1;
                    b
                },
                "bad magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[4] = 9;
                    b
                },
                "version 9",
            ),
            (
                {
                    let mut b = good.clone();
                    b[12] = 200;
                    b
                },
                "header says",
            ),
            (
                {
                    let mut b = good.clone();
                    b[30] ^= 0xff;
                    b
                },
                "checksum",
            ),
            (
                {
                    let mut b = good.clone();
                    b.push(0);
                    b
                },
                "header says",
            ),
        ];
        for (bytes, want) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let e = Profile::load(d.path(), "run-abc").unwrap_err();
            let s = e.to_string();
            assert!(s.contains(want) && s.contains("run-abc.profile"), "{s}");
        }
        // A valid file of another checkpoint under this name.
        let mut other = sample();
        other.key = "run-zzz".into();
        std::fs::write(&path, other.encode()).unwrap();
        let e = Profile::load(d.path(), "run-abc").unwrap_err();
        assert!(e.to_string().contains("not the checkpoint's"), "{e}");
        // Unaligned run with a correct checksum.
        let mut bad = sample();
        bad.runs[0].vaddr += 1;
        std::fs::write(&path, bad.encode()).unwrap();
        let e = Profile::load(d.path(), "run-abc").unwrap_err();
        assert!(e.to_string().contains("unaligned"), "{e}");
    }

    #[test]
    fn recorder_merges_and_stops_when_full() {
        let mut r = Recorder::with_capacity(2);
        r.push(1, 0x1000, 1);
        r.push(1, 0x2000, 2);
        r.push(2, 0x2000, 1);
        r.push(1, 0x9000, 1); // no room: recording stops
        r.push(2, 0x3000, 1);
        assert_eq!(r.pages(), 4);
        let p = r.into_profile("k".into());
        assert_eq!(
            p.runs,
            vec![
                ProfileRun {
                    pid: 1,
                    pages: 3,
                    vaddr: 0x1000
                },
                ProfileRun {
                    pid: 2,
                    pages: 1,
                    vaddr: 0x2000
                }
            ]
        );
    }

    #[test]
    fn key_from_run_id_or_hash() {
        use crate::images::testutil::write_inventory;
        let d = tempfile::tempdir().unwrap();
        write_inventory(d.path()).unwrap();
        std::fs::write(d.path().join("pstree.img"), b"x").unwrap();
        let k1 = checkpoint_key(d.path()).unwrap();
        assert!(k1.starts_with("hash-") && k1.len() == 21, "{k1}");
        std::fs::write(d.path().join("pagemap-1.img"), b"y").unwrap();
        let k2 = checkpoint_key(d.path()).unwrap();
        assert_ne!(k1, k2);
        // An inventory with field 13 (string): tag 13 << 3 | 2 = 0x6a.
        let id = b"1f2e/3d4c";
        let mut msg = vec![0x08, 0x02, 0x6a, u8::try_from(id.len()).unwrap()];
        msg.extend_from_slice(id);
        let mut inv = crate::images::INVENTORY_MAGIC.to_le_bytes().to_vec();
        inv.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_le_bytes());
        inv.extend_from_slice(&msg);
        std::fs::write(d.path().join("inventory.img"), inv).unwrap();
        assert_eq!(checkpoint_key(d.path()).unwrap(), "run-1f2e_3d4c");
    }
}
