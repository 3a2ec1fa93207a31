#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The toy world shipped in the repository's `models/` folder, Pea's default model when `pea generate` is
/// given no `--model`: `models/toyworld/` (the English teacher, an SD1-format diffusers pipeline) and
/// `models/toyworld-zh/` (a Chinese-CLIP text tower in `text_encoder/` and the PEA adapter trained by
/// `pea train` in `adapter.safetensors`).
///
/// Search order (`locate`): `$PEA_MODELS` (the folder holding `toyworld/`; when set, nothing else is tried);
/// `models/` in each folder above the running executable (`.build/release/pea` → the repository); `models/` in
/// the current directory.
public struct BundledModels: Sendable {
    /// The folder holding `toyworld/` and `toyworld-zh/`.
    public let root: String

    public var teacher: String { joinPath(root, "toyworld") }
    public var chineseEncoder: String { joinPath(joinPath(root, "toyworld-zh"), "text_encoder") }
    public var chineseAdapter: String { joinPath(joinPath(root, "toyworld-zh"), "adapter.safetensors") }

    public init(root: String) { self.root = root }

    /// The bundled models, or an error saying where they were looked for.
    public static func locate() throws -> BundledModels {
        if let variable = getenv("PEA_MODELS"), case let root = String(cString: variable), !root.isEmpty {
            guard isBundle(root) else {
                throw PEAError.invalidFile(path: root, reason: "PEA_MODELS names no bundled toy world (no toyworld/model_index.json inside)")
            }
            return BundledModels(root: root)
        }
        let candidates = searchPaths()
        if let root = candidates.first(where: isBundle) { return BundledModels(root: root) }
        throw PEAError.invalidFile(path: candidates.first ?? "models",
                                   reason: "the bundled toy world was not found (looked in \(candidates.joined(separator: ", "))); "
                                       + "set PEA_MODELS to the folder holding toyworld/")
    }

    /// The `models/` folders searched when PEA_MODELS is not set, in order.
    public static func searchPaths() -> [String] {
        var paths = foldersAboveExecutable().map { joinPath($0, "models") }
        if let cwd = currentDirectory(), !paths.contains(joinPath(cwd, "models")) { paths.append(joinPath(cwd, "models")) }
        return paths
    }

    static func isBundle(_ root: String) -> Bool { isRegularFile(joinPath(joinPath(root, "toyworld"), "model_index.json")) }

    /// Whether `text` holds CJK ideographs (then the bundled Chinese encoder and adapter read it).
    public static func isChinese(_ text: String) -> Bool {
        text.unicodeScalars.contains { scalar in
            switch scalar.value {
            case 0x3400...0x4DBF, 0x4E00...0x9FFF, 0xF900...0xFAFF, 0x20000...0x2FA1F: return true
            default: return false
            }
        }
    }
}
