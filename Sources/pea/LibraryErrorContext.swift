import PEADiffusion

/// Runs `body` and, when `applies`, puts `option`'s name in front of a usage error it throws: the library
/// speaks of its parameters (clipSkip, maxLength), the user typed flags.
func naming<T>(_ option: CommandOption, in options: ParsedOptions, when applies: Bool = true, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch PEAError.usage(let message) where applies {
        throw PEAError.usage("\(options.command): \(option.name): \(message)")
    }
}
