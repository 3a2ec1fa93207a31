#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// diffusers folders: a pipeline root (`model_index.json` with `unet/`, `vae/`, `text_encoder/`, …
/// subfolders) or one component's folder (`config.json` and its weights). Wherever a component is asked
/// for, either may be given.
public enum ModelFolder {
    /// The folder of `component` ("unet", "vae", …): `folder` itself when it holds a `config.json`,
    /// else `folder/component` when `folder` is a pipeline root.
    public static func component(_ folder: String, _ component: String) throws -> String {
        guard isDirectory(folder) else {
            throw PEAError.invalidFile(path: folder, reason: "not a folder (expected a diffusers model folder)")
        }
        if isRegularFile(joinPath(folder, "config.json")) { return folder }
        let sub = joinPath(folder, component)
        if isRegularFile(joinPath(folder, "model_index.json")) || isDirectory(sub) {
            guard isRegularFile(joinPath(sub, "config.json")) else {
                throw PEAError.invalidFile(path: folder, reason: "pipeline folder without \(component)/config.json")
            }
            return sub
        }
        throw PEAError.invalidFile(path: folder, reason: "neither a \(component) folder (config.json) nor a pipeline folder (model_index.json)")
    }
}
