#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// VAE latents of training images, kept on disk so each image is encoded once.
///
/// One safetensors file per (record id, resolution, namespace): tensor `latent` (f32 [C, h, w]) with metadata
/// `id`, `resolution` and `namespace`. Files live at `<folder>/<2 hex>/<16 hex>.safetensors`, the hex digits
/// being a 64-bit FNV-1a hash of the key; the metadata are compared on load, so a hash collision or a file of
/// another key reads as a miss, never as a wrong latent. Writes are atomic (`writeFileAtomically`), so a
/// crash leaves either no file or a whole one; a file that cannot be read back (e.g. from another tool) is
/// also a miss and is overwritten by the next `store`.
///
/// `namespace` separates latents of different encoders: pass something that identifies the VAE (its folder
/// and scaling, say), since a cache of one VAE's latents is wrong for another.
public struct LatentCache: Sendable {
    public let folder: String
    public let namespace: String

    /// Creates `folder` (and its parents) when missing.
    /// - Throws: `PEAError.invalidFile` naming the folder when it cannot be created.
    public init(folder: String, namespace: String = "") throws {
        self.folder = folder.hasSuffix("/") && folder.count > 1 ? String(folder.dropLast()) : folder
        self.namespace = namespace
        try makeDirectories(self.folder)
    }

    /// The file that holds the latent of `id` at `resolution`.
    public func path(id: String, resolution: Int) -> String {
        let hash = LatentCache.fnv1a64(Array("\(namespace)\u{0}\(id)\u{0}\(resolution)".utf8))
        let hex = String(hash, radix: 16)
        let name = String(repeating: "0", count: 16 - hex.count) + hex
        return "\(folder)/\(name.prefix(2))/\(name).safetensors"
    }

    /// The cached latent, or nil when there is none for this key (or the file is unreadable or holds another
    /// key).
    public func load(id: String, resolution: Int) -> HostTensor? {
        let file = path(id: id, resolution: resolution)
        guard let tensors = try? SafeTensorsFile(path: file),
              tensors.metadata["id"] == id, tensors.metadata["resolution"] == String(resolution),
              tensors.metadata["namespace"] ?? "" == namespace,
              let latent = try? tensors.tensor("latent"), latent.dtype == .f32, latent.shape.count == 3 else {
            return nil
        }
        return latent
    }

    /// Stores `latent` (f32, [C, h, w]) for `id` at `resolution`, replacing any earlier one, atomically.
    /// - Throws: `PEAError.shapeMismatch` for another dtype or rank; `PEAError.invalidFile` for I/O errors.
    public func store(_ latent: HostTensor, id: String, resolution: Int) throws {
        guard latent.dtype == .f32, latent.shape.count == 3 else {
            throw PEAError.shapeMismatch("a cached latent must be f32 [C, h, w], not \(latent.dtype) \(latent.shape)")
        }
        let file = path(id: id, resolution: resolution)
        try makeDirectories(String(file[..<file.lastIndex(of: "/")!]))
        try SafeTensorsWriter.write([(name: "latent", tensor: latent)],
                                    metadata: ["id": id, "resolution": String(resolution), "namespace": namespace],
                                    to: file)
    }

    /// FNV-1a, 64 bits.
    static func fnv1a64(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01B3
        }
        return hash
    }
}
