//! A small flattened-device-tree writer (no allocation) and the VM's device
//! tree: memory at 0x4000_0000, one cpu node per vCPU with `reg` = its
//! MPIDR, PSCI with method "hvc", the generic timer, a GICv3, a PL011 at
//! 0x0900_0000 and /chosen with bootargs and stdout-path.

const FDT_MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const END: u32 = 9;

/// Why a device tree could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdtError {
    /// The structure or strings block overflowed its fixed buffer.
    TooBig,
}

/// A device-tree writer with fixed-size buffers.
pub struct FdtWriter {
    st: [u8; 4096],
    st_len: usize,
    strings: [u8; 512],
    str_len: usize,
    err: bool,
}

impl FdtWriter {
    /// An empty writer.
    pub fn new() -> Self {
        FdtWriter {
            st: [0; 4096],
            st_len: 0,
            strings: [0; 512],
            str_len: 0,
            err: false,
        }
    }

    fn put(&mut self, b: &[u8]) {
        if self.st_len + b.len() > self.st.len() {
            self.err = true;
            return;
        }
        self.st[self.st_len..self.st_len + b.len()].copy_from_slice(b);
        self.st_len += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }
    fn pad(&mut self) {
        while !self.st_len.is_multiple_of(4) && !self.err {
            self.put(&[0]);
        }
    }
    fn string_off(&mut self, name: &str) -> u32 {
        let nb = name.as_bytes();
        // Reuse an existing identical string.
        let mut i = 0;
        while i < self.str_len {
            let end = self.strings[i..self.str_len]
                .iter()
                .position(|&b| b == 0)
                .map_or(self.str_len, |p| i + p);
            if &self.strings[i..end] == nb {
                return i as u32;
            }
            i = end + 1;
        }
        let off = self.str_len;
        if off + nb.len() + 1 > self.strings.len() {
            self.err = true;
            return 0;
        }
        self.strings[off..off + nb.len()].copy_from_slice(nb);
        self.strings[off + nb.len()] = 0;
        self.str_len += nb.len() + 1;
        off as u32
    }

    /// Opens a node.
    pub fn begin(&mut self, name: &str) {
        self.u32(BEGIN_NODE);
        self.put(name.as_bytes());
        self.put(&[0]);
        self.pad();
    }
    /// Closes the current node.
    pub fn end(&mut self) {
        self.u32(END_NODE);
    }
    /// A property with raw bytes.
    pub fn prop(&mut self, name: &str, val: &[u8]) {
        let off = self.string_off(name);
        self.u32(PROP);
        self.u32(val.len() as u32);
        self.u32(off);
        self.put(val);
        self.pad();
    }
    /// A string property (NUL added).
    pub fn prop_str(&mut self, name: &str, s: &str) {
        let off = self.string_off(name);
        self.u32(PROP);
        self.u32(s.len() as u32 + 1);
        self.u32(off);
        self.put(s.as_bytes());
        self.put(&[0]);
        self.pad();
    }
    /// A property of big-endian u32 cells.
    pub fn prop_cells(&mut self, name: &str, cells: &[u32]) {
        let off = self.string_off(name);
        self.u32(PROP);
        self.u32(cells.len() as u32 * 4);
        self.u32(off);
        for &c in cells {
            self.u32(c);
        }
    }
    /// A property with a 64-bit address/size list (2 cells each).
    pub fn prop_reg64(&mut self, name: &str, pairs: &[(u64, u64)]) {
        let off = self.string_off(name);
        self.u32(PROP);
        self.u32(pairs.len() as u32 * 16);
        self.u32(off);
        for &(a, s) in pairs {
            self.u32((a >> 32) as u32);
            self.u32(a as u32);
            self.u32((s >> 32) as u32);
            self.u32(s as u32);
        }
    }

    /// Writes the finished blob into `out`; returns its size.
    ///
    /// # Errors
    /// [`FdtError::TooBig`] if a buffer overflowed or `out` is too small.
    pub fn finish(mut self, out: &mut [u8]) -> Result<usize, FdtError> {
        self.u32(END);
        if self.err {
            return Err(FdtError::TooBig);
        }
        let hdr = 40usize;
        let rsv = hdr; // memory reservation block: one empty entry (16 bytes)
        let st_off = rsv + 16;
        let str_off = st_off + self.st_len;
        let total = str_off + self.str_len;
        if total > out.len() {
            return Err(FdtError::TooBig);
        }
        out[..total].fill(0);
        let fields = [
            FDT_MAGIC,
            total as u32,
            st_off as u32,
            str_off as u32,
            rsv as u32,
            17,
            16,
            0,
            self.str_len as u32,
            self.st_len as u32,
        ];
        for (i, f) in fields.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&f.to_be_bytes());
        }
        out[st_off..str_off].copy_from_slice(&self.st[..self.st_len]);
        out[str_off..total].copy_from_slice(&self.strings[..self.str_len]);
        Ok(total)
    }
}

impl Default for FdtWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// The guest's UART.
pub const GUEST_UART: u64 = 0x0900_0000;
/// The guest's GICv3 distributor and redistributor regions.
pub const GUEST_GICD: (u64, u64) = (0x0800_0000, 0x1_0000);
/// Redistributor region (one 128 KiB frame per vCPU).
pub const GUEST_GICR: (u64, u64) = (0x080a_0000, 0xf6_0000);

/// Writes the device tree of a VM with `vcpus` vCPUs (MPIDR = index) and
/// `mem` bytes of RAM at `mem_base` into `out`, with an initrd at
/// `initrd` = (start, end) IPAs if given (`/chosen/linux,initrd-start` and
/// `-end`); returns its size.
///
/// # Errors
/// [`FdtError::TooBig`] (a command line that does not fit).
pub fn vm_device_tree(
    out: &mut [u8],
    mem_base: u64,
    mem: u64,
    vcpus: usize,
    bootargs: &str,
    initrd: Option<(u64, u64)>,
) -> Result<usize, FdtError> {
    write_tree(out, mem_base, mem, vcpus, bootargs, initrd, false)
}

/// [`vm_device_tree`] for a VM offered a virtual PMU: with a `pmu` node
/// (`arm,armv8-pmuv3`, its overflow interrupt PPI 7 = INTID 23, level).
///
/// # Errors
/// [`FdtError::TooBig`] (a command line that does not fit).
pub fn vm_device_tree_pmu(
    out: &mut [u8],
    mem_base: u64,
    mem: u64,
    vcpus: usize,
    bootargs: &str,
    initrd: Option<(u64, u64)>,
) -> Result<usize, FdtError> {
    write_tree(out, mem_base, mem, vcpus, bootargs, initrd, true)
}

/// The PMU node's `interrupts`: PPI 7 (INTID 23), level high.
pub const PMU_INTERRUPTS: [u32; 3] = [1, 7, 4];

fn write_tree(
    out: &mut [u8],
    mem_base: u64,
    mem: u64,
    vcpus: usize,
    bootargs: &str,
    initrd: Option<(u64, u64)>,
    pmu: bool,
) -> Result<usize, FdtError> {
    let mut w = FdtWriter::new();
    w.begin("");
    w.prop_cells("#address-cells", &[2]);
    w.prop_cells("#size-cells", &[2]);
    w.prop_str("compatible", "linux,dummy-virt");
    w.prop_str("model", "pkvm-rs guest");
    w.prop_cells("interrupt-parent", &[1]);

    w.begin("chosen");
    w.prop_str("bootargs", bootargs);
    w.prop_str("stdout-path", "/pl011@9000000");
    if let Some((start, end)) = initrd {
        w.prop("linux,initrd-start", &start.to_be_bytes());
        w.prop("linux,initrd-end", &end.to_be_bytes());
    }
    w.end();

    let mut name = NameBuf::new();
    name.set("memory@", mem_base);
    w.begin(name.as_str());
    w.prop_str("device_type", "memory");
    w.prop_reg64("reg", &[(mem_base, mem)]);
    w.end();

    w.begin("cpus");
    w.prop_cells("#address-cells", &[1]);
    w.prop_cells("#size-cells", &[0]);
    for i in 0..vcpus {
        name.set("cpu@", i as u64);
        w.begin(name.as_str());
        w.prop_str("device_type", "cpu");
        w.prop_str("compatible", "arm,armv8");
        w.prop_cells("reg", &[i as u32]);
        w.prop_str("enable-method", "psci");
        w.end();
    }
    w.end();

    w.begin("psci");
    w.prop("compatible", b"arm,psci-1.0\0arm,psci-0.2\0arm,psci\0");
    w.prop_str("method", "hvc");
    w.end();

    w.begin("timer");
    w.prop_str("compatible", "arm,armv8-timer");
    w.prop_cells(
        "interrupts",
        &[1, 13, 0xf04, 1, 14, 0xf04, 1, 11, 0xf04, 1, 10, 0xf04],
    );
    w.prop("always-on", &[]);
    w.end();

    if pmu {
        w.begin("pmu");
        w.prop_str("compatible", "arm,armv8-pmuv3");
        w.prop_cells("interrupts", &PMU_INTERRUPTS);
        w.end();
    }

    w.begin("intc@8000000");
    w.prop_str("compatible", "arm,gic-v3");
    w.prop_cells("#interrupt-cells", &[3]);
    w.prop("interrupt-controller", &[]);
    w.prop_reg64("reg", &[GUEST_GICD, GUEST_GICR]);
    w.prop_cells("phandle", &[1]);
    w.end();

    w.begin("apb-pclk");
    w.prop_str("compatible", "fixed-clock");
    w.prop_cells("#clock-cells", &[0]);
    w.prop_cells("clock-frequency", &[24_000_000]);
    w.prop_cells("phandle", &[2]);
    w.end();

    w.begin("pl011@9000000");
    w.prop("compatible", b"arm,pl011\0arm,primecell\0");
    w.prop_reg64("reg", &[(GUEST_UART, 0x1000)]);
    w.prop_cells("interrupts", &[0, 1, 4]);
    w.prop_cells("clocks", &[2, 2]);
    w.prop("clock-names", b"uartclk\0apb_pclk\0");
    w.end();

    w.end();
    w.finish(out)
}

/// A tiny buffer for node names like `memory@40000000`.
struct NameBuf {
    b: [u8; 32],
    n: usize,
}

impl NameBuf {
    fn new() -> Self {
        NameBuf { b: [0; 32], n: 0 }
    }
    fn set(&mut self, prefix: &str, unit: u64) {
        self.n = 0;
        for &c in prefix.as_bytes() {
            self.b[self.n] = c;
            self.n += 1;
        }
        let digits = if unit == 0 {
            1
        } else {
            (64 - unit.leading_zeros()).div_ceil(4) as usize
        };
        for i in (0..digits).rev() {
            let d = ((unit >> (i * 4)) & 0xf) as u8;
            self.b[self.n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            self.n += 1;
        }
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.b[..self.n]).unwrap_or("node")
    }
}

/// Checks a blob with the `fdt` crate: memory, cpus, bootargs, PSCI method,
/// PL011, the initrd range.
///
/// # Errors
/// A description of the first mismatch.
pub fn verify(
    blob: &[u8],
    mem_base: u64,
    mem: u64,
    vcpus: usize,
    bootargs: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), &'static str> {
    let f = fdt::Fdt::new(blob).map_err(|_| "fdt crate rejects the blob")?;
    let chosen_u64 = |name: &str| {
        f.find_node("/chosen")
            .and_then(|c| c.property(name))
            .and_then(|p| <[u8; 8]>::try_from(p.value).ok())
            .map(u64::from_be_bytes)
    };
    if initrd.map(|i| (Some(i.0), Some(i.1)))
        != Some((
            chosen_u64("linux,initrd-start"),
            chosen_u64("linux,initrd-end"),
        ))
        .filter(|p| p.0.is_some())
    {
        return Err("initrd range mismatch");
    }
    let r = f.memory().regions().next().ok_or("no memory region")?;
    if r.starting_address as u64 != mem_base || r.size != Some(mem as usize) {
        return Err("memory node mismatch");
    }
    if f.cpus().count() != vcpus {
        return Err("cpu count mismatch");
    }
    if f.cpus().enumerate().any(|(i, c)| c.ids().first() != i) {
        return Err("cpu reg != MPIDR");
    }
    if f.chosen().bootargs().unwrap_or("") != bootargs {
        return Err("bootargs mismatch");
    }
    let psci = f.find_node("/psci").ok_or("no psci node")?;
    if psci.property("method").and_then(|p| p.as_str()) != Some("hvc") {
        return Err("psci method is not hvc");
    }
    if f.find_compatible(&["arm,pl011"])
        .and_then(|n| n.reg())
        .and_then(|mut r| r.next())
        .map(|r| r.starting_address as u64)
        != Some(GUEST_UART)
    {
        return Err("pl011 reg mismatch");
    }
    Ok(())
}

/// Checks the PMU node of a blob from [`vm_device_tree_pmu`].
///
/// # Errors
/// A description of the mismatch.
pub fn verify_pmu(blob: &[u8]) -> Result<(), &'static str> {
    let f = fdt::Fdt::new(blob).map_err(|_| "fdt crate rejects the blob")?;
    let n = f
        .find_compatible(&["arm,armv8-pmuv3"])
        .ok_or("no arm,armv8-pmuv3 node")?;
    let cells: Option<alloc::vec::Vec<u32>> = n.property("interrupts").map(|p| {
        p.value
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    });
    if cells.as_deref() != Some(&PMU_INTERRUPTS[..]) {
        return Err("pmu interrupts are not PPI 7, level");
    }
    Ok(())
}
