//! The protobuf (proto2) messages of the CRIU images the lazy path reads, defined in-crate with
//! `prost` derives. Only the fields we use are declared; prost skips the others on decode.
//!
//! Field numbers follow CRIU's `images/*.proto` (criu's images/pagemap.proto, mm.proto, pstree.proto).

/// `inventory_entry` (images/inventory.proto): only the version fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InventoryEntry {
    /// 2 for every current dump (`CRTOOLS_IMAGES_V1_1`).
    #[prost(uint32, required, tag = "1")]
    pub img_version: u32,
    /// Must be true: older images are refused by CRIU too ("Too old image").
    #[prost(bool, optional, tag = "2")]
    pub fdinfo_per_id: Option<bool>,
}

/// `pstree_entry` (images/pstree.proto): one per process, zombies included. Virtual pids.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PstreeEntry {
    /// Virtual pid of the process.
    #[prost(uint32, required, tag = "1")]
    pub pid: u32,
    /// Virtual parent pid, 0 for the root.
    #[prost(uint32, required, tag = "2")]
    pub ppid: u32,
    /// Process group id.
    #[prost(uint32, required, tag = "3")]
    pub pgid: u32,
    /// Session id.
    #[prost(uint32, required, tag = "4")]
    pub sid: u32,
    /// Thread ids (written unpacked by CRIU; prost reads both encodings).
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `vma_entry` (images/vma.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmaEntry {
    /// First address of the VMA.
    #[prost(uint64, required, tag = "1")]
    pub start: u64,
    /// End address (exclusive).
    #[prost(uint64, required, tag = "2")]
    pub end: u64,
    /// File offset in pages units as CRIU stores it.
    #[prost(uint64, required, tag = "3")]
    pub pgoff: u64,
    /// File id or shmem id.
    #[prost(uint64, required, tag = "4")]
    pub shmid: u64,
    /// `PROT_*` bits.
    #[prost(uint32, required, tag = "5")]
    pub prot: u32,
    /// `MAP_*` bits.
    #[prost(uint32, required, tag = "6")]
    pub flags: u32,
    /// CRIU `VMA_*` status bits.
    #[prost(uint32, required, tag = "7")]
    pub status: u32,
    /// Always -1 in images.
    #[prost(sint64, required, tag = "8")]
    pub fd: i64,
    /// madvise bits.
    #[prost(uint64, optional, tag = "9")]
    pub madv: Option<u64>,
    /// File flags of a file-backed VMA.
    #[prost(uint32, optional, tag = "10")]
    pub fdflags: Option<u32>,
}

/// `mm_entry` (images/mm.proto): only the VMA list is declared.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MmEntry {
    /// The process's VMAs, sorted by address.
    #[prost(message, repeated, tag = "14")]
    pub vmas: Vec<VmaEntry>,
}

/// `pagemap_head` (images/pagemap.proto): first entry of `pagemap-<pid>.img`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapHead {
    /// Names `pages-<pages_id>.img`.
    #[prost(uint32, required, tag = "1")]
    pub pages_id: u32,
}

/// `pagemap_entry` (images/pagemap.proto), with the CRIU 4.2 field 5.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapEntry {
    /// Dump-time address of the first page.
    #[prost(uint64, required, tag = "1")]
    pub vaddr: u64,
    /// Page count up to CRIU 4.1; written as 0 by 4.2+ (`compat_nr_pages`).
    #[prost(uint32, required, tag = "2")]
    pub compat_nr_pages: u32,
    /// Legacy "data is in the parent" marker.
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    /// `PE_*` bits; absent means `PE_PRESENT`.
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    /// Page count since CRIU 4.2; preferred when present.
    #[prost(uint64, optional, tag = "5")]
    pub nr_pages: Option<u64>,
}
