#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What a request sized by a user's numbers (an image size, layer widths, a schedule length) needs, checked
/// before anything is allocated: a Swift array that cannot be allocated ends the process ("Fatal error: failed
/// to allocate"), and an allocation that barely succeeds takes the machine down with it. Estimates are Doubles
/// so that computing them cannot overflow.
public enum MemoryBudget {
    /// The machine's physical memory in bytes (Int.max when the system does not say).
    public static let physicalBytes: Double = {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), pageSize = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && pageSize > 0 ? Double(pages) * Double(pageSize) : Double(Int.max)
    }()

    /// Throws `error("<what> needs N GB, more than this machine's M GB of memory")` when `bytes` exceeds the
    /// physical memory, or, with a `backend` whose memory is its own (a GPU's), that memory.
    public static func require(_ bytes: Double, on backend: (any ComputeBackend)? = nil, for what: @autoclosure () -> String,
                               error: (String) -> PEAError = { .backend($0, kind: .outOfMemory) }) throws {
        let device = backend.flatMap { backend in backend.deviceMemoryBytes.map { (name: backend.name, bytes: $0) } }
        try require(bytes, device: device, for: what(), error: error)
    }

    static func require(_ bytes: Double, device: (name: String, bytes: Double)?, for what: @autoclosure () -> String,
                        error: (String) -> PEAError) throws {
        if bytes > physicalBytes {
            throw error("\(what()) needs \(amount(bytes)), more than this machine's \(amount(physicalBytes)) of memory")
        }
        if let device, bytes > device.bytes {
            throw error("\(what()) needs \(amount(bytes)), more than the \(device.name) device's \(amount(device.bytes)) of memory")
        }
    }

    /// `bytes` in GB (10⁹) with one decimal below 10 and whole numbers above, or in whole MB (10⁶) below 1 GB.
    static func amount(_ bytes: Double) -> String {
        if bytes < 1e9 { return "\(Int((bytes / 1e6).rounded())) MB" }
        let value = bytes / 1e9
        if value < 10 { return "\(String((value * 10).rounded() / 10)) GB" }
        return value < 1e15 ? "\(Int(value.rounded())) GB" : "\(value) GB"
    }
}
