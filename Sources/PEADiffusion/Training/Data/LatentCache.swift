#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// VAE latents of training images, kept on disk so each image is encoded once.
///
/// One safetensors file per (record id, shape key, namespace): tensor `latent` (f32 [C, h, w]) with metadata
/// `id`, `shape` (the `TrainingImageShape.cacheKey`: the square's side, or the buckets and crop), `namespace`
/// and `geometry` (the image's `ImageGeometry`: the sizes and crop SDXL is conditioned on, known without decoding
/// the image again). Files live at `<folder>/<2 hex>/<16 hex>.safetensors`, the hex digits being a 64-bit
/// FNV-1a hash of the key; the metadata are compared on load, so a hash collision or a file of another key reads
/// as a miss, never as a wrong latent. Writes are atomic (`writeFileAtomically`), so a crash leaves either no file
/// or a whole one; a file that cannot be read back (e.g. from another tool, or an older Pea's without `geometry`)
/// is also a miss and is overwritten by the next `store`.
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

    /// The file that holds the latent of `id` for the shape key `shape`.
    public func path(id: String, shape: String) -> String {
        let hash = FNV1a.hash64(Array("\(namespace)\u{0}\(id)\u{0}\(shape)".utf8))
        let hex = String(hash, radix: 16)
        let name = String(repeating: "0", count: 16 - hex.count) + hex
        return "\(folder)/\(name.prefix(2))/\(name).safetensors"
    }

    /// The cached latent and its image's geometry, or nil when there is none for this key (or the file is
    /// unreadable or holds another key).
    public func load(id: String, shape: String) -> (latent: HostTensor, geometry: ImageGeometry)? {
        let file = path(id: id, shape: shape)
        guard let tensors = try? SafeTensorsFile(path: file),
              tensors.metadata["id"] == id, tensors.metadata["shape"] == shape,
              tensors.metadata["namespace"] ?? "" == namespace,
              let geometry = tensors.metadata["geometry"].flatMap(ImageGeometry.init(serialized:)),
              let latent = try? tensors.tensor("latent"), latent.dtype == .f32, latent.shape.count == 3 else {
            return nil
        }
        return (latent, geometry)
    }

    /// Stores `latent` (f32, [C, h, w]) and its image's geometry for `id` under the shape key `shape`,
    /// replacing any earlier one, atomically.
    /// - Throws: `PEAError.shapeMismatch` for another dtype or rank; `PEAError.invalidFile` for I/O errors.
    public func store(_ latent: HostTensor, geometry: ImageGeometry, id: String, shape: String) throws {
        guard latent.dtype == .f32, latent.shape.count == 3 else {
            throw PEAError.shapeMismatch("a cached latent must be f32 [C, h, w], not \(latent.dtype) \(latent.shape)")
        }
        let file = path(id: id, shape: shape)
        try makeDirectories(String(file[..<file.lastIndex(of: "/")!]))
        try SafeTensorsWriter.write([(name: "latent", tensor: latent)],
                                    metadata: ["id": id, "shape": shape, "namespace": namespace, "geometry": geometry.serialized],
                                    to: file)
    }
}
