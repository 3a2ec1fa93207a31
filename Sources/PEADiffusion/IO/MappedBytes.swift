#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A file's bytes, memory-mapped read-only (or a copy of bytes already in memory), for the readers of weight
/// files (safetensors, torch.save). The mapping lives as long as the object.
final class MappedBytes: @unchecked Sendable {
    let buffer: UnsafeRawBufferPointer
    private let mapped: Bool

    /// Maps the regular file at `path`; an empty file gives an empty buffer.
    /// - Throws: `PEAError.invalidFile` naming the path when it cannot be opened, is not a regular file, or
    ///   cannot be mapped.
    init(path: String) throws {
        let (descriptor, size) = try openRegularFile(path)
        defer { close(descriptor) }  // the mapping stays valid after the descriptor is closed
        guard size > 0 else {
            buffer = UnsafeRawBufferPointer(start: nil, count: 0)
            mapped = false
            return
        }
        guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, descriptor, 0),
              base != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw PEAError.invalidFile(path: path, reason: "cannot map \(size) bytes: \(systemErrorMessage())")
        }
        buffer = UnsafeRawBufferPointer(start: base, count: size)
        mapped = true
    }

    /// Tells the kernel the pages wholly inside `range` (offsets into `buffer`) are not needed for now: they leave
    /// the process's resident set (the file's page cache keeps them) and are read again if touched. For weights
    /// copied to a backend's own memory, so that loading a model does not hold it twice.
    func releasePages(_ range: Range<Int>) {
        guard mapped, let base = buffer.baseAddress else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let address = Int(bitPattern: base)
        let start = (address + range.lowerBound + page - 1) / page * page, end = (address + range.upperBound) / page * page
        guard page > 0, end > start else { return }
        madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, Int32(MADV_DONTNEED))
    }

    init(copying bytes: [UInt8]) {
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        bytes.withUnsafeBytes { memory.copyMemory(from: $0) }
        buffer = UnsafeRawBufferPointer(start: memory.baseAddress, count: bytes.count)
        mapped = false
    }

    deinit {
        if mapped {
            munmap(UnsafeMutableRawPointer(mutating: buffer.baseAddress), buffer.count)
        } else {
            UnsafeMutableRawPointer(mutating: buffer.baseAddress)?.deallocate()
        }
    }
}
