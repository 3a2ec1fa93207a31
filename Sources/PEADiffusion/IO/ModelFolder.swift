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

/// The running executable's path (`/proc/self/exe`), nil where it cannot be read.
func executablePath() -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { return nil }
    buffer[length] = 0
    return String(cString: buffer)
}

/// The folders above the running executable's, nearest first, up to `levels` of them (`.build/release/pea` →
/// `.build`, then the repository, …): where a build finds the repository it was built in.
func foldersAboveExecutable(levels: Int = 6) -> [String] {
    guard var folder = executablePath().map(parentFolder) else { return [] }
    var folders: [String] = []
    for _ in 0..<levels where folder != "/" && !folder.isEmpty {
        folder = parentFolder(folder)
        folders.append(folder)
    }
    return folders
}

/// The working directory, nil where it cannot be read.
func currentDirectory() -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    guard getcwd(&buffer, buffer.count) != nil else { return nil }
    return String(cString: buffer)
}

func isDirectory(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
}

/// `mkdir -p`: creates `path` and any missing parent folders; an existing non-folder is an error naming it.
func makeDirectories(_ path: String) throws {
    guard !path.isEmpty else { return }
    var status = stat()
    if stat(path, &status) == 0 {
        guard (status.st_mode & S_IFMT) == S_IFDIR else {
            throw PEAError.invalidFile(path: path, reason: "exists and is not a folder")
        }
        return
    }
    if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
        try makeDirectories(String(path[..<slash]))
    }
    guard mkdir(path, 0o755) == 0 || errno == EEXIST else {
        throw PEAError.invalidFile(path: path, reason: "cannot create the folder: \(systemErrorMessage())")
    }
}
